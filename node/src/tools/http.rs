//! `http_fetch`: one HTTP request with reqwest, the response body capped in size, to the
//! destinations the node's network policy permits ([`super::netpolicy`]: checked for the URL,
//! for every address the host resolves to at connect time, and at every redirect hop, at most
//! [`MAX_REDIRECTS`]).

use std::collections::BTreeMap;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::netpolicy::{NetPolicy, PolicyResolver, denied_in};
use super::{Error, Tool, ToolContext, ToolFuture, encode_bytes, parse_args, schema_of};

/// Redirects followed at most.
pub const MAX_REDIRECTS: usize = 10;

/// Arguments of `http_fetch`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpFetchArgs {
    /// Absolute `http://` or `https://` URL.
    pub url: String,
    /// HTTP method (default `GET`).
    #[serde(default)]
    pub method: Option<String>,
    /// Request headers, name to value.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// Request body, sent as UTF-8 text.
    #[serde(default)]
    pub body: Option<String>,
}

/// `http_fetch`: returns `{status, headers, body, body_encoding, bytes, truncated}`; the body is
/// cut at the configured cap (`truncated: true`), and is base64 when it is not UTF-8.
pub struct HttpFetch {
    client: reqwest::Client,
    max_body_bytes: u64,
    policy: NetPolicy,
}

impl HttpFetch {
    /// A fetcher returning at most `max_body_bytes` of each body, reaching only what `policy`
    /// permits.
    ///
    /// # Errors
    /// [`Error::Setup`] if the HTTP client cannot be built (TLS setup).
    pub fn new(max_body_bytes: u64, policy: NetPolicy) -> Result<Self, Error> {
        let hops = policy.clone();
        let client = reqwest::Client::builder()
            .user_agent(concat!("apex-node/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(std::sync::Arc::new(PolicyResolver::new(policy.clone())))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                match hops.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(denied) => attempt.error(denied),
                }
            }))
            .build()
            .map_err(|e| Error::Setup(error_chain(&e)))?;
        Ok(Self {
            client,
            max_body_bytes,
            policy,
        })
    }
}

/// A request error as the task's error: `access_denied` when the policy refused a destination
/// (at resolve time or at a redirect), else `task_execution_failed`.
fn request_error(e: &reqwest::Error, what: &str) -> Error {
    match denied_in(e) {
        Some(d) => Error::AccessDenied(format!("http_fetch refused: {d}")),
        None => Error::Failed(format!("{what} failed: {}", error_chain(e))),
    }
}

impl Tool for HttpFetch {
    fn name(&self) -> &'static str {
        "http_fetch"
    }
    fn description(&self) -> &'static str {
        "Makes an HTTP request and returns {status, headers, body, truncated}; the body is capped"
    }
    fn parameters(&self) -> Value {
        schema_of::<HttpFetchArgs>()
    }
    fn call(&self, args: Value, _ctx: ToolContext) -> ToolFuture {
        let client = self.client.clone();
        let policy = self.policy.clone();
        let cap = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        Box::pin(async move {
            let args: HttpFetchArgs = parse_args(args)?;
            let request = build_request(&client, &policy, args)?;
            let mut response = request
                .send()
                .await
                .map_err(|e| request_error(&e, "request"))?;
            let status = response.status().as_u16();
            let headers = headers_to_json(response.headers());
            let mut body: Vec<u8> = Vec::new();
            let mut truncated = false;
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| request_error(&e, "reading body"))?
            {
                let room = cap - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    truncated = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            let (text, encoding) = encode_bytes(&body);
            Ok(json!({
                "status": status,
                "headers": headers,
                "body": text,
                "body_encoding": encoding,
                "bytes": body.len(),
                "truncated": truncated,
            }))
        })
    }
}

fn build_request(
    client: &reqwest::Client,
    policy: &NetPolicy,
    args: HttpFetchArgs,
) -> Result<reqwest::RequestBuilder, Error> {
    let url = reqwest::Url::parse(&args.url)
        .map_err(|e| Error::InvalidArguments(format!("`url` is not a valid url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::InvalidArguments(format!(
            "`url` must use http or https, not {}",
            url.scheme()
        )));
    }
    policy
        .check_url(&url)
        .map_err(|d| Error::AccessDenied(format!("http_fetch refused: {d}")))?;
    let method = match args.method.as_deref() {
        None => reqwest::Method::GET,
        Some(m) => {
            reqwest::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).map_err(|_| {
                Error::InvalidArguments(format!("`method` `{m}` is not an http method"))
            })?
        }
    };
    let mut headers = HeaderMap::new();
    for (name, value) in args.headers.unwrap_or_default() {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            Error::InvalidArguments(format!("`headers` has an invalid header name `{name}`"))
        })?;
        let v = HeaderValue::from_str(&value).map_err(|_| {
            Error::InvalidArguments(format!("`headers` has an invalid value for `{name}`"))
        })?;
        headers.append(n, v);
    }
    let mut request = client.request(method, url).headers(headers);
    if let Some(body) = args.body {
        request = request.body(body);
    }
    Ok(request)
}

fn headers_to_json(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

/// An error and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The test servers listen on loopback, which the default policy refuses.
    fn loopback_allowed() -> NetPolicy {
        NetPolicy::new(&["127.0.0.1/32".to_owned()], &[]).unwrap()
    }

    /// Serves one canned response on 127.0.0.1 and returns the URL and the raw request.
    async fn one_shot_server(response: Vec<u8>) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let mut req = Vec::new();
            loop {
                let n = sock.read(&mut buf).await.unwrap();
                req.extend_from_slice(&buf[..n]);
                if n == 0 || req.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            sock.write_all(&response).await.unwrap();
            sock.shutdown().await.unwrap();
            String::from_utf8_lossy(&req).into_owned()
        });
        (format!("http://{addr}/path?q=1"), handle)
    }

    #[tokio::test]
    async fn fetches_and_caps_the_body() {
        let body = "x".repeat(100);
        let response = format!(
            "HTTP/1.1 201 Created\r\nContent-Length: {}\r\nX-Test: a\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (url, server) = one_shot_server(response.into_bytes()).await;
        let tool = HttpFetch::new(10, loopback_allowed()).unwrap();
        let out = tool
            .call(
                json!({"url": url, "method": "post", "headers": {"X-Req": "1"}, "body": "hi"}),
                ToolContext::detached(),
            )
            .await
            .unwrap();
        assert_eq!(out["status"], 201);
        assert_eq!(out["headers"]["x-test"], "a");
        assert_eq!(out["body"], "xxxxxxxxxx");
        assert_eq!(out["truncated"], true);
        let request = server.await.unwrap();
        assert!(request.starts_with("POST /path?q=1 HTTP/1.1"), "{request}");
        assert!(request.to_ascii_lowercase().contains("x-req: 1"));
    }

    #[tokio::test]
    async fn rejects_bad_arguments() {
        let tool = HttpFetch::new(10, loopback_allowed()).unwrap();
        for (args, needle) in [
            (json!({"url": "ftp://x"}), "http or https"),
            (json!({"url": "not a url"}), "`url`"),
            (
                json!({"url": "http://x", "method": "BAD METHOD"}),
                "`method`",
            ),
            (
                json!({"url": "http://x", "headers": {"bad header": "v"}}),
                "header name",
            ),
            (
                json!({"url": "http://x", "timeout": 1}),
                "unknown field `timeout`",
            ),
            (json!({}), "missing field `url`"),
        ] {
            let err = tool
                .call(args.clone(), ToolContext::detached())
                .await
                .unwrap_err();
            assert_eq!(err.code(), "invalid_arguments", "{args}");
            assert!(err.to_string().contains(needle), "{args}: {err}");
        }
    }

    #[tokio::test]
    async fn unreachable_host_fails_the_task() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let tool = HttpFetch::new(10, loopback_allowed()).unwrap();
        let err = tool
            .call(
                json!({"url": format!("http://{addr}/")}),
                ToolContext::detached(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "task_execution_failed");
    }

    #[tokio::test]
    async fn the_default_policy_refuses_loopback_and_metadata_addresses() {
        let (url, _server) =
            one_shot_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi".to_vec()).await;
        let tool = HttpFetch::new(10, NetPolicy::default()).unwrap();
        let port = url
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        for target in [
            url.clone(),
            format!("http://localhost:{port}/"),
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            "http://[fd00:ec2::254]/".to_owned(),
        ] {
            let err = tool
                .call(json!({"url": target}), ToolContext::detached())
                .await
                .unwrap_err();
            assert_eq!(err.code(), "access_denied", "{target}: {err}");
        }
    }

    #[tokio::test]
    async fn a_redirect_to_a_refused_address_is_refused() {
        let (url, _server) = one_shot_server(
            b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/latest/meta-data/\r\ncontent-length: 0\r\n\r\n".to_vec(),
        )
        .await;
        let tool = HttpFetch::new(10, loopback_allowed()).unwrap();
        let err = tool
            .call(json!({"url": url}), ToolContext::detached())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "access_denied", "{err}");
        assert!(err.to_string().contains("169.254.169.254"), "{err}");
    }

    #[tokio::test]
    async fn a_denied_host_is_refused_before_any_lookup() {
        let policy = NetPolicy::new(&[], &["*.internal.example".to_owned()]).unwrap();
        let tool = HttpFetch::new(10, policy).unwrap();
        let err = tool
            .call(
                json!({"url": "http://db.internal.example/"}),
                ToolContext::detached(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "access_denied", "{err}");
    }
}

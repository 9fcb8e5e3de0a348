//! The HTTP client of OpenAI-compatible upstreams on the gateway's hot path: hyper's pooled
//! HTTP/1.1 client (`hyper_util::client::legacy`) over rustls with the platform's certificate
//! verifier, for `http://` and `https://` base URLs.
//!
//! Why not reqwest here: its per-request layers cost about a tenth of the hub's CPU per
//! proxied call (its redirect policy formats and re-parses the URL of every request even with
//! redirects off; client and connector clones; proxy matching), and the gateway needs none of
//! them: it posts one JSON body to one URL parsed at start and streams the answer back.
//! Model discovery, off the hot path, still uses reqwest.
//!
//! Not supported here: `HTTP(S)_PROXY` environment variables (reqwest honours them). An
//! upstream behind a forward proxy is reached through an OpenAI-compatible relay instead.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_platform_verifier::BuilderVerifierExt;

/// A pooled upstream client (one per provider). Cloning shares the pool.
#[derive(Clone)]
pub struct UpstreamHttp {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl UpstreamHttp {
    /// A client with TCP_NODELAY, `connect_timeout` per connection attempt, at most
    /// `pool_max_idle` idle keep-alive connections per host, idle ones closed after 90 s.
    ///
    /// # Errors
    /// A message if TLS cannot be set up (no usable crypto provider or platform verifier).
    pub fn new(connect_timeout: Duration, pool_max_idle: usize) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_platform_verifier()
            .map_err(|e| format!("TLS certificate verifier: {e}"))?
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Self { client })
    }

    /// `POST uri` with a JSON `body` and the optional `Authorization` value; resolves when the
    /// response head has arrived.
    ///
    /// # Errors
    /// A description of the failure without the URL ([`describe`]).
    pub async fn post_json(
        &self,
        uri: &Uri,
        auth: Option<&HeaderValue>,
        body: Vec<u8>,
    ) -> Result<Response<Incoming>, String> {
        let mut req = Request::post(uri.clone());
        if let Some(h) = req.headers_mut() {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(a) = auth {
                h.insert(AUTHORIZATION, a.clone());
            }
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request failed: {e}"))?;
        self.client.request(req).await.map_err(|e| {
            let kind = if e.is_connect() {
                "connection failed"
            } else {
                "request failed"
            };
            describe(kind, &e)
        })
    }
}

/// The whole body of a response.
///
/// # Errors
/// A description if the connection failed before its end.
pub async fn read_all(body: Incoming) -> Result<Bytes, String> {
    body.collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| describe("bad response body", &e))
}

/// The body of a response as its data chunks, as they arrive.
pub fn data_stream(body: Incoming) -> BoxStream<'static, Result<Bytes, String>> {
    body.into_data_stream()
        .map(|r| r.map_err(|e| describe("stream broken", &e)))
        .boxed()
}

/// `kind: cause: cause of cause...`: hyper's errors name no URL, so nothing that could carry
/// credentials in a query string is logged.
fn describe(kind: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = kind.to_owned();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    if s == kind {
        s.push_str(": ");
        s.push_str(&e.to_string());
    }
    s
}

//! [`OpenAiUpstream`]: a provider speaking the OpenAI Chat Completions API over HTTP, with one
//! pooled hyper client per provider for chat calls ([`super::upstream_http`]) and reqwest for
//! model discovery. Embeddings go to `<base_url>/embeddings` (always asking for floats).
//!
//! Streams are passed through with minimal work: each upstream `data:` line is parsed once
//! (borrowed) for the normalized fields and forwarded as received, except that `model` is
//! rewritten to the requested name when the caller used an alias or `provider/model`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::sse::{Event, Splitter};
use super::upstream_http::{self, UpstreamHttp};
use super::{
    Backend, CallContext, ChatChunk, ChatRequest, ChunkStream, LlmError, ModelInfo, ProviderConfig,
    Usage, unix_now,
};

/// An OpenAI-compatible upstream (`kind = "openai"`).
pub struct OpenAiUpstream {
    name: String,
    /// `<base_url>/chat/completions`, parsed once.
    chat_url: http::Uri,
    /// `<base_url>/embeddings`.
    embeddings_url: http::Uri,
    models_url: String,
    /// `Bearer <key>`, read from `api_key_env` at build time. Never logged: `Debug` is not
    /// derived for this type.
    auth: Option<reqwest::header::HeaderValue>,
    /// Chat calls (the hot path).
    http: UpstreamHttp,
    /// Model discovery.
    client: reqwest::Client,
    models: Arc<RwLock<Vec<ModelInfo>>>,
    first_token_timeout: Duration,
    total_timeout: Duration,
}

impl OpenAiUpstream {
    /// Builds the client. Models come from `cfg.models`, or, when empty, from
    /// `GET <base_url>/models` in a background task (retried every 30 s until it succeeds).
    ///
    /// # Errors
    /// [`LlmError::Unavailable`] if the HTTP client cannot be built or the key is not a valid
    /// header value.
    pub fn new(cfg: &ProviderConfig) -> Result<Self, LlmError> {
        let base = cfg.base_url.trim_end_matches('/');
        let auth = match std::env::var(&cfg.api_key_env) {
            Ok(k) if !cfg.api_key_env.is_empty() && !k.is_empty() => {
                let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {k}"))
                    .map_err(|_| {
                        LlmError::Unavailable(format!(
                            "provider `{}`: the key in ${} is not a valid header value",
                            cfg.name, cfg.api_key_env
                        ))
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            _ => {
                if !cfg.api_key_env.is_empty() {
                    tracing::warn!(provider = %cfg.name, env = %cfg.api_key_env,
                        "llm provider key variable is unset or empty; calling without a key");
                }
                None
            }
        };
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout())
            .pool_max_idle_per_host(cfg.pool_max_idle)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            // A chat completion is a POST: an upstream that redirects it is misconfigured, and
            // following would re-send the body (and key) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| LlmError::Unavailable(format!("provider `{}`: {e}", cfg.name)))?;
        let http = UpstreamHttp::new(cfg.connect_timeout(), cfg.pool_max_idle)
            .map_err(|e| LlmError::Unavailable(format!("provider `{}`: {e}", cfg.name)))?;
        let models: Vec<ModelInfo> = cfg
            .models
            .iter()
            .map(|m| ModelInfo {
                id: m.clone(),
                created: 0,
                owned_by: cfg.name.clone(),
            })
            .collect();
        let up = Self {
            name: cfg.name.clone(),
            chat_url: format!("{base}/chat/completions")
                .parse::<http::Uri>()
                .map_err(|e| {
                    LlmError::Unavailable(format!("provider `{}`: bad base_url: {e}", cfg.name))
                })?,
            embeddings_url: format!("{base}/embeddings")
                .parse::<http::Uri>()
                .map_err(|e| {
                    LlmError::Unavailable(format!("provider `{}`: bad base_url: {e}", cfg.name))
                })?,
            models_url: format!("{base}/models"),
            auth,
            http,
            client,
            models: Arc::new(RwLock::new(models)),
            first_token_timeout: cfg.first_token_timeout(),
            total_timeout: cfg.total_timeout(),
        };
        if cfg.models.is_empty() {
            up.spawn_discovery();
        }
        Ok(up)
    }

    fn spawn_discovery(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(provider = %self.name, "no runtime: model discovery skipped");
            return;
        };
        let (client, url, auth, name, models) = (
            self.client.clone(),
            self.models_url.clone(),
            self.auth.clone(),
            self.name.clone(),
            self.models.clone(),
        );
        rt.spawn(async move {
            loop {
                match discover(&client, &url, auth.as_ref(), &name).await {
                    Ok(list) => {
                        tracing::info!(provider = %name, models = list.len(), "llm models discovered");
                        *models.write() = list;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(provider = %name, error = %e,
                            "llm model discovery failed; retrying in 30 s");
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            }
        });
    }

    async fn start(
        &self,
        model: &str,
        req: &ChatRequest,
    ) -> Result<http::Response<hyper::body::Incoming>, LlmError> {
        let body = req
            .upstream_json(model)
            .map_err(|e| LlmError::invalid("body", e.to_string()))?;
        self.post(&self.chat_url, body).await
    }

    /// `POST url` with a JSON body; a non-2xx answer is the error it maps to.
    async fn post(
        &self,
        url: &http::Uri,
        body: Vec<u8>,
    ) -> Result<http::Response<hyper::body::Incoming>, LlmError> {
        let resp = self
            .http
            .post_json(url, self.auth.as_ref(), body)
            .await
            .map_err(|e| LlmError::Unavailable(format!("provider `{}`: {e}", self.name)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = upstream_http::read_all(resp.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let message =
            upstream_message(&text).unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
        let message = format!("provider `{}`: {message}", self.name);
        Err(if status.as_u16() == 429 {
            LlmError::RateLimited(message)
        } else {
            LlmError::Upstream {
                status: Some(status.as_u16()),
                message,
            }
        })
    }
}

async fn discover(
    client: &reqwest::Client,
    url: &str,
    auth: Option<&reqwest::header::HeaderValue>,
    name: &str,
) -> Result<Vec<ModelInfo>, String> {
    #[derive(Deserialize)]
    struct List {
        data: Vec<Item>,
    }
    #[derive(Deserialize)]
    struct Item {
        id: String,
        #[serde(default)]
        created: u64,
    }
    let mut rb = client.get(url).timeout(Duration::from_secs(30));
    if let Some(a) = auth {
        rb = rb.header(reqwest::header::AUTHORIZATION, a.clone());
    }
    let resp = rb.send().await.map_err(|e| describe_reqwest(&e))?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status().as_u16()));
    }
    let list: List = resp.json().await.map_err(|e| describe_reqwest(&e))?;
    Ok(list
        .data
        .into_iter()
        .map(|i| ModelInfo {
            id: i.id,
            created: i.created,
            owned_by: name.to_owned(),
        })
        .collect())
}

/// A reqwest error without its URL (URLs could carry credentials in query strings).
fn describe_reqwest(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "bad response body"
    } else {
        "request failed"
    };
    let mut s = kind.to_owned();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// `error.message` of an OpenAI error body, if it is one.
fn upstream_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?;
    e.get("message")
        .and_then(|m| m.as_str())
        .or_else(|| e.as_str())
        .map(|s| s.chars().take(500).collect())
}

#[derive(Deserialize)]
struct WireChunk<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Vec<WireChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<WireMessage<'a>>,
    #[serde(borrow, default)]
    message: Option<WireMessage<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct WireMessage<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

/// Parses one upstream JSON object (a stream chunk or a whole completion) into a normalized
/// chunk whose `raw` reports `reported_model`.
fn normalize(data: Bytes, reported_model: &str) -> Result<ChatChunk, LlmError> {
    let w: WireChunk<'_> = serde_json::from_slice(&data).map_err(|e| LlmError::Upstream {
        status: None,
        message: format!("malformed upstream chunk: {e}"),
    })?;
    if let Some(err) = w.error {
        let message = upstream_message(&format!("{{\"error\":{}}}", err.get()))
            .unwrap_or_else(|| err.get().chars().take(500).collect());
        return Err(LlmError::Upstream {
            status: None,
            message: format!("upstream error mid-stream: {message}"),
        });
    }
    let mut c = ChatChunk {
        usage: w.usage,
        ..ChatChunk::default()
    };
    if let Some(ch) = w.choices.first() {
        if let Some(m) = ch.delta.as_ref().or(ch.message.as_ref()) {
            if let Some(t) = &m.content {
                c.text = t.to_string();
            }
            if let Some(tc) = m.tool_calls {
                c.tool_calls = serde_json::from_str(tc.get()).ok();
            }
        }
        c.finish_reason = ch.finish_reason.as_ref().map(|s| s.to_string());
    }
    let needs_rewrite = w.model.as_deref().is_some_and(|m| m != reported_model);
    let current = w.model.map(Cow::into_owned);
    c.raw = Some(match current {
        Some(m) if needs_rewrite => rewrite_model(data, &m, reported_model),
        _ => data,
    });
    Ok(c)
}

/// Replaces the top-level `"model":"<from>"` value by `to`: a byte splice when the value
/// appears literally, else a full re-serialisation.
fn rewrite_model(data: Bytes, from: &str, to: &str) -> Bytes {
    let finder = memchr::memmem::find(&data, b"\"model\"");
    if let Some(at) = finder {
        let mut i = at + 7;
        while data
            .get(i)
            .is_some_and(|b| b.is_ascii_whitespace() || *b == b':')
        {
            i += 1;
        }
        let want = serde_json::to_string(from).unwrap_or_default();
        if data.get(i..i + want.len()) == Some(want.as_bytes()) {
            let to_json = serde_json::to_string(to).unwrap_or_default();
            let mut out = Vec::with_capacity(data.len() + to_json.len());
            out.extend_from_slice(&data[..i]);
            out.extend_from_slice(to_json.as_bytes());
            out.extend_from_slice(&data[i + want.len()..]);
            return Bytes::from(out);
        }
    }
    match serde_json::from_slice::<serde_json::Value>(&data) {
        Ok(mut v) => {
            v["model"] = serde_json::Value::String(to.to_owned());
            serde_json::to_vec(&v).map(Bytes::from).unwrap_or(data)
        }
        Err(_) => data,
    }
}

impl Backend for OpenAiUpstream {
    fn name(&self) -> &str {
        &self.name
    }

    fn models(&self) -> Vec<ModelInfo> {
        let now = unix_now();
        self.models
            .read()
            .iter()
            .map(|m| ModelInfo {
                created: if m.created == 0 { now } else { m.created },
                ..m.clone()
            })
            .collect()
    }

    fn serves(&self, model: &str) -> bool {
        self.models.read().iter().any(|m| m.id == model)
    }

    fn first_token_timeout(&self) -> Duration {
        self.first_token_timeout
    }

    fn total_timeout(&self) -> Duration {
        self.total_timeout
    }

    fn embeddings<'a>(
        &'a self,
        model: &'a str,
        req: &'a super::embeddings::EmbeddingRequest,
    ) -> BoxFuture<'a, Result<super::embeddings::Embeddings, LlmError>> {
        self.embed(model, req).boxed()
    }

    fn call<'a>(
        &'a self,
        model: &'a str,
        req: &'a ChatRequest,
        _ctx: &'a CallContext,
    ) -> BoxFuture<'a, Result<ChunkStream, LlmError>> {
        async move {
            let resp = self.start(model, req).await?;
            let reported = req.model.clone();
            if !req.stream {
                let body = upstream_http::read_all(resp.into_body())
                    .await
                    .map_err(|e| LlmError::Upstream {
                        status: None,
                        message: format!("provider `{}`: {e}", self.name),
                    })?;
                let c = normalize(body, &reported)?;
                return Ok(futures::stream::once(async move { Ok(c) }).boxed());
            }
            let name = self.name.clone();
            let state = StreamState {
                body: upstream_http::data_stream(resp.into_body()),
                split: Splitter::default(),
                finished: false,
                saw_finish: false,
                eof: false,
            };
            let s = futures::stream::unfold(state, move |mut st| {
                let reported = reported.clone();
                let name = name.clone();
                async move {
                    if st.finished {
                        return None;
                    }
                    loop {
                        let ev = st
                            .split
                            .next_event()
                            .or_else(|| if st.eof { st.split.rest() } else { None });
                        match ev {
                            Some(Event::Done) => return None,
                            Some(Event::Data(d)) => {
                                let r = normalize(d, &reported);
                                match &r {
                                    Ok(c) => st.saw_finish |= c.finish_reason.is_some(),
                                    Err(_) => st.finished = true,
                                }
                                return Some((r, st));
                            }
                            None if st.eof => {
                                st.finished = true;
                                if st.saw_finish {
                                    return None;
                                }
                                let e = LlmError::Upstream {
                                    status: None,
                                    message: format!(
                                        "provider `{name}`: the stream ended before the answer did"
                                    ),
                                };
                                return Some((Err(e), st));
                            }
                            None => {}
                        }
                        match st.body.next().await {
                            Some(Ok(b)) => {
                                if let Err(m) = st.split.push(&b) {
                                    st.finished = true;
                                    let e = LlmError::Upstream {
                                        status: None,
                                        message: m,
                                    };
                                    return Some((Err(e), st));
                                }
                            }
                            Some(Err(e)) => {
                                st.finished = true;
                                let e = LlmError::Upstream {
                                    status: None,
                                    message: format!("provider `{name}`: {e}"),
                                };
                                return Some((Err(e), st));
                            }
                            None => st.eof = true,
                        }
                    }
                }
            });
            Ok(s.boxed())
        }
        .boxed()
    }
}

/// An OpenAI embeddings response (`data[].embedding` as floats or base64).
#[derive(Deserialize)]
struct WireEmbeddings {
    data: Vec<WireEmbedding>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct WireEmbedding {
    #[serde(default)]
    index: usize,
    embedding: WireVector,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WireVector {
    Floats(Vec<f32>),
    Base64(String),
}

impl OpenAiUpstream {
    async fn embed(
        &self,
        model: &str,
        req: &super::embeddings::EmbeddingRequest,
    ) -> Result<super::embeddings::Embeddings, LlmError> {
        let body = serde_json::to_vec(&req.upstream_body(model))
            .map_err(|e| LlmError::invalid("body", e.to_string()))?;
        let resp = self.post(&self.embeddings_url, body).await?;
        let bad = |m: String| LlmError::Upstream {
            status: None,
            message: format!("provider `{}`: {m}", self.name),
        };
        let bytes = upstream_http::read_all(resp.into_body())
            .await
            .map_err(&bad)?;
        let mut w: WireEmbeddings = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("malformed embeddings response: {e}")))?;
        w.data.sort_by_key(|d| d.index);
        let vectors = w
            .data
            .into_iter()
            .map(|d| match d.embedding {
                WireVector::Floats(v) => Some(v),
                WireVector::Base64(s) => super::embeddings::floats_of_base64(&s),
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("an embedding is neither floats nor base64".to_owned()))?;
        Ok(super::embeddings::Embeddings {
            vectors,
            prompt_tokens: w.usage.map_or(0, |u| u.prompt_tokens),
        })
    }
}

struct StreamState {
    body: futures::stream::BoxStream<'static, Result<Bytes, String>>,
    split: Splitter,
    finished: bool,
    saw_finish: bool,
    eof: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_model_by_splice_and_by_reserialisation() {
        let d = Bytes::from_static(br#"{"id":"x","model": "gpt-4o","choices":[]}"#);
        let out = rewrite_model(d, "gpt-4o", "fast");
        assert_eq!(&out[..], br#"{"id":"x","model": "fast","choices":[]}"#);
        let d = Bytes::from_static(br#"{"id":"x","model":"g\u0070t","choices":[]}"#);
        let out = rewrite_model(d, "gpt", "fast");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "fast");
    }

    #[test]
    fn normalizes_stream_chunks_and_errors() {
        let d = Bytes::from_static(
            br#"{"model":"m","choices":[{"index":0,"delta":{"content":"hi","tool_calls":[{"index":0,"id":"c"}]},"finish_reason":null}]}"#,
        );
        let c = normalize(d.clone(), "m").unwrap();
        assert_eq!(c.text, "hi");
        assert_eq!(c.tool_calls.unwrap()[0]["id"], "c");
        assert_eq!(c.raw.unwrap(), d);
        let e = normalize(
            Bytes::from_static(br#"{"error":{"message":"boom","type":"server_error"}}"#),
            "m",
        )
        .unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
    }
}

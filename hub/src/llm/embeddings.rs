//! Embeddings through the gateway: `POST /v1/embeddings` (OpenAI-compatible) and the vectors
//! memory search ranks with ([`crate::memory`]).
//!
//! - [`EmbeddingRequest`] is the OpenAI request: `model`, `input` (a string, an array of
//!   strings, an array of token ids or an array of such arrays), `encoding_format` (`float`,
//!   the default, or `base64`: little-endian `f32`s), `dimensions`, and any other field
//!   passed to the upstream untouched.
//! - [`Gateway::embeddings`] routes it like a chat call: aliases, `provider/model`, every
//!   backend serving the name, then `llm.fallbacks`; connect errors, 429, 5xx and timeouts
//!   (the provider's `first_token_timeout_ms`) move on to the next deployment. A backend that
//!   does not embed (the default of [`Backend::embeddings`], e.g. node-hosted models) answers
//!   400 on `model`.
//! - OpenAI-compatible upstreams get `POST <base_url>/embeddings` with `encoding_format:
//!   "float"` (the hub encodes base64 itself, so upstreams that only speak floats work); the
//!   built-in `mock` answers [`mock_vector`]s.
//! - Counted in `apex_llm_requests_total` / `apex_llm_request_duration_seconds` and the prompt
//!   tokens in `apex_llm_tokens_total`, like chat calls.

use std::time::Instant;

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{Backend, Gateway, LlmError, record_failed};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// Dimensions of the mock's vectors when the request gives none.
pub const MOCK_DIMENSIONS: usize = 256;

/// Largest `dimensions` a request may ask for.
pub const MAX_DIMENSIONS: usize = 8192;

/// How the vectors of a response are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EncodingFormat {
    /// JSON arrays of numbers (the default).
    #[default]
    Float,
    /// Base64 of the little-endian `f32`s (what the `openai` Python package asks for).
    Base64,
}

/// An embeddings request in the OpenAI shape.
#[derive(Debug, Clone, Default)]
pub struct EmbeddingRequest {
    /// The requested model name (an alias, `provider/model`, or a model name).
    pub model: String,
    /// The texts, one per input (token-id inputs written as `t<id>` words, for the mock).
    pub texts: Vec<String>,
    /// `input` as the client sent it (what OpenAI-compatible upstreams receive).
    pub input: Value,
    /// `encoding_format`.
    pub encoding_format: EncodingFormat,
    /// `dimensions`, when given.
    pub dimensions: Option<usize>,
    /// Every other body field (`user`, …), passed to OpenAI-compatible upstreams.
    pub extra: Map<String, Value>,
}

/// The vectors of an answer, one per input, in input order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embeddings {
    /// One vector per input.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens of the input, as the backend reported them.
    pub prompt_tokens: u64,
}

fn invalid_input() -> LlmError {
    LlmError::invalid(
        "input",
        "`input` must be a non-empty string, an array of 1 to 2048 non-empty strings, an array \
         of token ids, or an array of such arrays",
    )
}

/// A token-id input as text (`t1 t2 …`), for backends that embed text only (the mock).
fn tokens_text(ids: &[Value]) -> Option<String> {
    let ids: Option<Vec<u64>> = ids.iter().map(Value::as_u64).collect();
    let ids = ids.filter(|v| !v.is_empty())?;
    Some(
        ids.iter()
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

impl EmbeddingRequest {
    /// Parses an OpenAI embeddings body.
    ///
    /// # Errors
    /// [`LlmError::InvalidRequest`] naming the field: body not an object, `model` missing,
    /// `input` missing, empty or of another shape (more than [`MAX_INPUTS`] items),
    /// `encoding_format` other than `float`/`base64`, `dimensions` not 1 to [`MAX_DIMENSIONS`].
    pub fn from_json(body: Value) -> Result<Self, LlmError> {
        let Value::Object(mut m) = body else {
            return Err(LlmError::invalid("body", "the body must be a JSON object"));
        };
        let model = match m.remove("model") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => {
                return Err(LlmError::invalid(
                    "model",
                    "`model` must be a non-empty string",
                ));
            }
        };
        let input = m.remove("input").unwrap_or(Value::Null);
        let texts = match &input {
            Value::String(s) if !s.is_empty() => vec![s.clone()],
            Value::Array(a) if !a.is_empty() && a.len() <= MAX_INPUTS => {
                if a.iter().all(Value::is_u64) {
                    vec![tokens_text(a).ok_or_else(invalid_input)?]
                } else {
                    a.iter()
                        .map(|x| match x {
                            Value::String(s) if !s.is_empty() => Some(s.clone()),
                            Value::Array(ids) => tokens_text(ids),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(invalid_input)?
                }
            }
            _ => return Err(invalid_input()),
        };
        let encoding_format = match m.remove("encoding_format") {
            None | Some(Value::Null) => EncodingFormat::Float,
            Some(Value::String(s)) if s == "float" => EncodingFormat::Float,
            Some(Value::String(s)) if s == "base64" => EncodingFormat::Base64,
            Some(_) => {
                return Err(LlmError::invalid(
                    "encoding_format",
                    "`encoding_format` must be `float` or `base64`",
                ));
            }
        };
        let dimensions = match m.remove("dimensions") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if (1..=MAX_DIMENSIONS).contains(&n) => Some(n),
                _ => {
                    return Err(LlmError::invalid(
                        "dimensions",
                        format!("`dimensions` must be an integer from 1 to {MAX_DIMENSIONS}"),
                    ));
                }
            },
        };
        Ok(Self {
            model,
            texts,
            input,
            encoding_format,
            dimensions,
            extra: m,
        })
    }

    /// A request embedding `texts` with `model` (the hub's own calls: memory search).
    pub fn texts(model: impl Into<String>, texts: Vec<String>) -> Self {
        let input = Value::Array(texts.iter().cloned().map(Value::String).collect());
        Self {
            model: model.into(),
            texts,
            input,
            ..Self::default()
        }
    }

    /// The body for an OpenAI-compatible upstream serving the model as `upstream_model`:
    /// `extra`, then `model`, `input` as sent, `dimensions`, and `encoding_format: "float"`.
    pub fn upstream_body(&self, upstream_model: &str) -> Value {
        let mut m = self.extra.clone();
        m.insert("model".to_owned(), json!(upstream_model));
        m.insert("input".to_owned(), self.input.clone());
        m.insert("encoding_format".to_owned(), json!("float"));
        if let Some(d) = self.dimensions {
            m.insert("dimensions".to_owned(), json!(d));
        }
        Value::Object(m)
    }
}

/// One item of a response's `data`.
#[derive(Serialize)]
struct Item<'a> {
    object: &'static str,
    index: usize,
    embedding: Encoded<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Encoded<'a> {
    Float(&'a [f32]),
    Base64(String),
}

/// Base64 of the little-endian bytes of `v`.
pub fn base64_of(v: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The `f32`s of a base64 string of little-endian bytes (`None` if it is not one).
pub fn floats_of_base64(s: &str) -> Option<Vec<f32>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

impl Embeddings {
    /// The OpenAI response body: `{object: "list", data: [{object: "embedding", index,
    /// embedding}], model, usage: {prompt_tokens, total_tokens}}`.
    pub fn to_json(&self, model: &str, format: EncodingFormat) -> Value {
        let data: Vec<Item<'_>> = self
            .vectors
            .iter()
            .enumerate()
            .map(|(index, v)| Item {
                object: "embedding",
                index,
                embedding: match format {
                    EncodingFormat::Float => Encoded::Float(v),
                    EncodingFormat::Base64 => Encoded::Base64(base64_of(v)),
                },
            })
            .collect();
        json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens},
        })
    }
}

/// The error of a backend that does not embed (the default of [`Backend::embeddings`]).
pub fn unsupported(backend: &str, model: &str) -> LlmError {
    LlmError::invalid(
        "model",
        format!("the model `{model}` does not serve embeddings (backend `{backend}` only chats)"),
    )
}

/// FNV-1a, 64 bits: a hash that is the same in every process and release.
fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x31F0..=0x31FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF
        | 0xAC00..=0xD7AF | 0xF900..=0xFAFF | 0x20000..=0x2FFFF)
}

/// The words the mock hashes: lowercased runs of letters and digits, and each CJK character
/// with the pair it starts.
fn mock_words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut prev_cjk: Option<char> = None;
    for c in text.chars() {
        if is_cjk(c) {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            out.push(c.to_string());
            if let Some(p) = prev_cjk {
                out.push(format!("{p}{c}"));
            }
            prev_cjk = Some(c);
        } else {
            prev_cjk = None;
            if c.is_alphanumeric() {
                word.extend(c.to_lowercase());
            } else if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// The mock's vector of `text`: deterministic, `dims` long, L2-normalised. Each word adds ±1
/// at a hashed coordinate and each of its character trigrams ±0.5, so texts sharing words
/// (or spellings: `memory`, `memories`) are near; a text without words is the first unit
/// vector.
pub fn mock_vector(text: &str, dims: usize) -> Vec<f32> {
    let dims = dims.max(1);
    let mut v = vec![0f32; dims];
    let mut add = |h: u64, w: f32| {
        let i = usize::try_from(h % dims as u64).unwrap_or(0);
        v[i] += if h >> 63 == 1 { -w } else { w };
    };
    for word in mock_words(text) {
        add(fnv(word.bytes()), 1.0);
        let chars: Vec<char> = std::iter::once('^')
            .chain(word.chars())
            .chain(std::iter::once('$'))
            .collect();
        if chars.len() > 4 {
            for g in chars.windows(3) {
                let s: String = g.iter().collect();
                add(fnv(s.bytes().chain([3u8])), 0.5);
            }
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    } else {
        v[0] = 1.0;
    }
    v
}

/// What the mock answers: [`mock_vector`]s of `dimensions` (default [`MOCK_DIMENSIONS`]),
/// usage counting whitespace-separated words.
pub fn mock_embeddings(req: &EmbeddingRequest) -> Embeddings {
    let dims = req.dimensions.unwrap_or(MOCK_DIMENSIONS);
    Embeddings {
        vectors: req.texts.iter().map(|t| mock_vector(t, dims)).collect(),
        prompt_tokens: req
            .texts
            .iter()
            .map(|t| t.split_whitespace().count() as u64)
            .sum(),
    }
}

fn record_ok(backend: &dyn Backend, model: &str, started: Instant, e: &Embeddings) {
    let m = crate::metrics::get();
    let labels = [backend.name(), model];
    m.llm_requests
        .with_label_values(&[labels[0], labels[1], "ok"])
        .inc();
    m.llm_tokens
        .with_label_values(&[labels[0], labels[1], "prompt"])
        .inc_by(e.prompt_tokens);
    m.llm_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
}

impl Gateway {
    /// Embeds `req.texts` with the first deployment of `req.model` that answers (see the
    /// [module docs](self)).
    ///
    /// # Errors
    /// [`LlmError::ModelNotFound`] when nothing serves the model; a backend's 400 (e.g. it does
    /// not embed) at once; otherwise the error of the last deployment tried.
    pub async fn embeddings(&self, req: &EmbeddingRequest) -> Result<Embeddings, LlmError> {
        let deployments = self.deployments(&req.model);
        if deployments.is_empty() {
            let e = LlmError::ModelNotFound(req.model.clone());
            record_failed(None, &e);
            return Err(e);
        }
        let mut last_err = None;
        for (i, d) in deployments.iter().enumerate() {
            let started = Instant::now();
            let limit = d.backend.first_token_timeout();
            let result = tokio::time::timeout(limit, d.backend.embeddings(&d.model, req))
                .await
                .unwrap_or_else(|_| {
                    Err(LlmError::Unavailable(format!(
                        "no embeddings from `{}/{}` within {} ms",
                        d.backend.name(),
                        d.model,
                        limit.as_millis()
                    )))
                });
            let result = result.and_then(|e| {
                if e.vectors.len() == req.texts.len() {
                    Ok(e)
                } else {
                    Err(LlmError::Upstream {
                        status: None,
                        message: format!(
                            "`{}/{}` answered {} vectors for {} inputs",
                            d.backend.name(),
                            d.model,
                            e.vectors.len(),
                            req.texts.len()
                        ),
                    })
                }
            });
            match result {
                Ok(e) => {
                    record_ok(d.backend.as_ref(), &d.model, started, &e);
                    return Ok(e);
                }
                Err(e) if e.retryable() => {
                    if i + 1 < deployments.len() {
                        tracing::warn!(backend = d.backend.name(), model = %d.model, error = %e,
                            "embedding deployment failed, trying the next");
                    }
                    last_err = Some((d, e));
                }
                Err(e) => {
                    record_failed(Some((d.backend.name(), &d.model)), &e);
                    return Err(e);
                }
            }
        }
        let (d, e) = last_err.unwrap_or_else(|| {
            (
                &deployments[0],
                LlmError::Unavailable("no deployment".to_owned()),
            )
        });
        record_failed(Some((d.backend.name(), &d.model)), &e);
        Err(e)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn parses_every_input_shape_and_refuses_bad_ones() {
        let r = EmbeddingRequest::from_json(json!({"model": "m", "input": "hi"})).unwrap();
        assert_eq!(r.texts, ["hi"]);
        assert_eq!(r.encoding_format, EncodingFormat::Float);
        let r = EmbeddingRequest::from_json(
            json!({"model": "m", "input": ["a", "b"], "encoding_format": "base64", "user": "u"}),
        )
        .unwrap();
        assert_eq!(r.texts, ["a", "b"]);
        assert_eq!(r.encoding_format, EncodingFormat::Base64);
        assert_eq!(r.extra["user"], "u");
        let r = EmbeddingRequest::from_json(json!({"model": "m", "input": [1, 2]})).unwrap();
        assert_eq!(r.texts, ["t1 t2"]);
        let r = EmbeddingRequest::from_json(json!({"model": "m", "input": [[1], [2, 3]]})).unwrap();
        assert_eq!(r.texts, ["t1", "t2 t3"]);
        for bad in [
            json!({"model": "m"}),
            json!({"model": "m", "input": ""}),
            json!({"model": "m", "input": []}),
            json!({"model": "m", "input": ["a", ""]}),
            json!({"model": "m", "input": [{"x": 1}]}),
            json!({"input": "a"}),
            json!({"model": "m", "input": "a", "encoding_format": "int8"}),
            json!({"model": "m", "input": "a", "dimensions": 0}),
        ] {
            assert!(EmbeddingRequest::from_json(bad.clone()).is_err(), "{bad}");
        }
        let body = EmbeddingRequest::from_json(
            json!({"model": "alias", "input": ["a"], "encoding_format": "base64", "dimensions": 8}),
        )
        .unwrap()
        .upstream_body("real");
        assert_eq!(
            body,
            json!({"model": "real", "input": ["a"], "encoding_format": "float", "dimensions": 8})
        );
    }

    #[test]
    fn mock_vectors_are_deterministic_normalised_and_near_for_similar_texts() {
        let a = mock_vector("the quarterly budget meeting", 256);
        assert_eq!(a, mock_vector("the quarterly budget meeting", 256));
        assert_eq!(a.len(), 256);
        assert!((cos(&a, &a) - 1.0).abs() < 1e-5);
        let near = mock_vector("budget meeting notes", 256);
        let far = mock_vector("写一首关于春天的诗", 256);
        assert!(cos(&a, &near) > cos(&a, &far) + 0.2, "{}", cos(&a, &near));
        let spring = mock_vector("春天", 256);
        assert!(cos(&spring, &far) > 0.2, "{}", cos(&spring, &far));
        assert_eq!(mock_vector("!!!", 4), vec![1.0, 0.0, 0.0, 0.0]);
    }

    /// A backend that only chats: the trait's default embeddings.
    struct ChatOnly;

    impl Backend for ChatOnly {
        fn name(&self) -> &str {
            "chat-only"
        }
        fn models(&self) -> Vec<super::super::ModelInfo> {
            Vec::new()
        }
        fn serves(&self, model: &str) -> bool {
            model == "talker"
        }
        fn call<'a>(
            &'a self,
            _model: &'a str,
            _req: &'a super::super::ChatRequest,
            _ctx: &'a super::super::CallContext,
        ) -> futures::future::BoxFuture<'a, Result<super::super::ChunkStream, LlmError>> {
            Box::pin(async { Err(LlmError::Unavailable("unused".to_owned())) })
        }
    }

    #[tokio::test]
    async fn a_backend_that_only_chats_answers_400_and_an_unknown_model_404() {
        let g = Gateway::empty().with_backend(std::sync::Arc::new(ChatOnly));
        let req = |m: &str| EmbeddingRequest::texts(m, vec!["x".to_owned()]);
        let e = g.embeddings(&req("talker")).await.unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.param(), Some("model"));
        assert!(e.to_string().contains("does not serve embeddings"), "{e}");
        let e = g.embeddings(&req("nope")).await.unwrap_err();
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn base64_round_trips_and_the_body_has_the_openai_shape() {
        let v = vec![0.5f32, -1.25, 3.0];
        assert_eq!(floats_of_base64(&base64_of(&v)).unwrap(), v);
        let e = Embeddings {
            vectors: vec![v.clone()],
            prompt_tokens: 3,
        };
        let f = e.to_json("m", EncodingFormat::Float);
        assert_eq!(f["object"], "list");
        assert_eq!(f["data"][0]["object"], "embedding");
        assert_eq!(f["data"][0]["embedding"], json!([0.5, -1.25, 3.0]));
        assert_eq!(f["usage"]["total_tokens"], 3);
        let b = e.to_json("m", EncodingFormat::Base64);
        assert_eq!(
            floats_of_base64(b["data"][0]["embedding"].as_str().unwrap()).unwrap(),
            v
        );
    }
}

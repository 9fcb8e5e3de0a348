//! [`Mock`]: the built-in `mock` provider. Deterministic text at a configurable pace, no
//! network; for local development, demos and tests.
//!
//! The answer is [`MOCK_WORDS`] repeated, one word per token, `max_tokens` tokens (or the
//! provider's `mock_tokens`); `finish_reason` is `length` when `max_tokens` cut it short,
//! else `stop`. Usage counts whitespace-separated words of the prompt's text contents.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use super::{
    Backend, CallContext, ChatChunk, ChatRequest, ChunkStream, LlmError, ModelInfo, ProviderConfig,
    Usage, unix_now,
};

/// The words the mock cycles through.
pub const MOCK_WORDS: [&str; 8] = [
    "This", " is", " a", " mock", " answer", " from", " apex", ".",
];

/// The `mock` provider.
#[derive(Debug, Clone)]
pub struct Mock {
    name: String,
    models: Vec<String>,
    tokens_per_second: f64,
    first_token_delay: Duration,
    tokens: u64,
    first_token_timeout: Duration,
    total_timeout: Duration,
}

impl Mock {
    /// A mock from its provider config (`models` default to `["mock"]`).
    pub fn new(cfg: &ProviderConfig) -> Self {
        Self {
            name: cfg.name.clone(),
            models: if cfg.models.is_empty() {
                vec!["mock".to_owned()]
            } else {
                cfg.models.clone()
            },
            tokens_per_second: cfg.mock_tokens_per_second,
            first_token_delay: Duration::from_millis(cfg.mock_first_token_delay_ms),
            tokens: cfg.mock_tokens.max(1),
            first_token_timeout: cfg.first_token_timeout(),
            total_timeout: cfg.total_timeout(),
        }
    }

    /// The whole text of an answer of `n` tokens.
    pub fn text(n: u64) -> String {
        (0..n)
            .map(|i| MOCK_WORDS[i as usize % MOCK_WORDS.len()])
            .collect()
    }
}

fn prompt_tokens(req: &ChatRequest) -> u64 {
    req.messages
        .iter()
        .filter_map(|m| m.get("content").and_then(|c| c.as_str()))
        .map(|s| s.split_whitespace().count() as u64)
        .sum()
}

impl Backend for Mock {
    fn name(&self) -> &str {
        &self.name
    }

    fn models(&self) -> Vec<ModelInfo> {
        let now = unix_now();
        self.models
            .iter()
            .map(|m| ModelInfo {
                id: m.clone(),
                created: now,
                owned_by: self.name.clone(),
            })
            .collect()
    }

    fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    fn first_token_timeout(&self) -> Duration {
        self.first_token_timeout
    }

    fn total_timeout(&self) -> Duration {
        self.total_timeout
    }

    fn call<'a>(
        &'a self,
        _model: &'a str,
        req: &'a ChatRequest,
        _ctx: &'a CallContext,
    ) -> BoxFuture<'a, Result<ChunkStream, LlmError>> {
        let n = req.max_tokens.map_or(self.tokens, |m| m.min(self.tokens));
        let finish = if n < self.tokens { "length" } else { "stop" };
        let usage = Usage {
            prompt_tokens: prompt_tokens(req),
            completion_tokens: n,
            total_tokens: prompt_tokens(req) + n,
        };
        let gap = if self.tokens_per_second > 0.0 {
            Duration::from_secs_f64(1.0 / self.tokens_per_second)
        } else {
            Duration::ZERO
        };
        let delay = self.first_token_delay;
        let stream = req.stream;
        let include_usage = req.include_usage;
        async move {
            if !stream {
                let s = futures::stream::once(async move {
                    tokio::time::sleep(delay + gap * (n.saturating_sub(1) as u32)).await;
                    Ok(ChatChunk {
                        text: Mock::text(n),
                        finish_reason: Some(finish.to_owned()),
                        usage: Some(usage),
                        ..ChatChunk::default()
                    })
                });
                return Ok(s.boxed());
            }
            // Items: tokens 0..n, then (n) the finish chunk, then (n+1) usage if asked.
            let last = if include_usage { n + 1 } else { n };
            let s = futures::stream::unfold(0u64, move |i| async move {
                if i > last {
                    return None;
                }
                let wait = if i == 0 {
                    delay
                } else if i < n {
                    gap
                } else {
                    Duration::ZERO
                };
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                let c = if i < n {
                    ChatChunk {
                        text: MOCK_WORDS[i as usize % MOCK_WORDS.len()].to_owned(),
                        ..ChatChunk::default()
                    }
                } else if i == n {
                    ChatChunk {
                        finish_reason: Some(finish.to_owned()),
                        ..ChatChunk::default()
                    }
                } else {
                    ChatChunk {
                        usage: Some(usage),
                        ..ChatChunk::default()
                    }
                };
                Some((Ok(c), i + 1))
            });
            Ok(s.boxed())
        }
        .boxed()
    }
}

//! The `llm` section of the hub config: upstream providers, aliases and fallback lists.
//!
//! ```toml
//! [[llm.providers]]
//! name = "openai"
//! base_url = "https://api.openai.com/v1"
//! api_key_env = "OPENAI_API_KEY"      # the key is read from this variable, never stored
//! models = ["gpt-4o-mini"]            # empty: discovered from GET <base_url>/models
//!
//! [[llm.providers]]
//! name = "mock"
//! kind = "mock"
//! models = ["mock"]
//! mock_tokens_per_second = 50.0
//!
//! [llm.aliases]
//! fast = ["openai/gpt-4o-mini", "mock/mock"]   # tried in order
//!
//! [llm.fallbacks]
//! "gpt-4o-mini" = ["backup/gpt-4o-mini"]        # after the deployments of the name itself
//! ```

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// LLM gateway settings (the `[llm]` table). Off unless providers are configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Upstream providers, tried in this order when several serve a model.
    pub providers: Vec<ProviderConfig>,
    /// Model aliases: a client-facing name → deployments tried in order, each
    /// `provider/model` or a model name (every provider serving it).
    pub aliases: HashMap<String, Vec<String>>,
    /// Per-model fallback lists: after every deployment of the requested name failed before
    /// its first token (connect error, timeout, 429, 5xx), these are tried in order.
    pub fallbacks: HashMap<String, Vec<String>>,
}

/// What a provider is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// An OpenAI-compatible HTTP API (`POST <base_url>/chat/completions`).
    #[default]
    Openai,
    /// The built-in mock: deterministic text, no network.
    Mock,
}

/// One upstream provider (`[[llm.providers]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name used in `provider/model` references, `owned_by` and logs. Unique; no `/`.
    pub name: String,
    /// `openai` (default) or `mock`.
    pub kind: ProviderKind,
    /// Base URL of the OpenAI-compatible API including its version path, e.g.
    /// `https://api.openai.com/v1`. Required for `openai`.
    pub base_url: String,
    /// Name of the environment variable holding the API key (sent as
    /// `Authorization: Bearer`). The key itself is never stored in config, logged or returned.
    /// Empty: no key is sent.
    pub api_key_env: String,
    /// Models served. Empty for `openai`: discovered from `GET <base_url>/models` at start
    /// (and retried every 30 s until it succeeds). Empty for `mock`: `["mock"]`.
    pub models: Vec<String>,
    /// TCP+TLS connect timeout, milliseconds. Default 5000.
    pub connect_timeout_ms: u64,
    /// Longest wait for the first chunk (streaming) or the whole answer (non-streaming) before
    /// the next deployment is tried, milliseconds. Default 60000.
    pub first_token_timeout_ms: u64,
    /// Longest a whole call may take, milliseconds. Default 600000.
    pub total_timeout_ms: u64,
    /// Idle pooled connections kept per upstream host. Default 256.
    pub pool_max_idle: usize,
    /// Mock only: tokens produced per second; 0 means as fast as possible. Default 0.
    pub mock_tokens_per_second: f64,
    /// Mock only: delay before the first token, milliseconds. Default 0.
    pub mock_first_token_delay_ms: u64,
    /// Mock only: tokens in an answer when the request sets no `max_tokens`. Default 16.
    pub mock_tokens: u64,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: ProviderKind::Openai,
            base_url: String::new(),
            api_key_env: String::new(),
            models: Vec::new(),
            connect_timeout_ms: 5000,
            first_token_timeout_ms: 60_000,
            total_timeout_ms: 600_000,
            pool_max_idle: 256,
            mock_tokens_per_second: 0.0,
            mock_first_token_delay_ms: 0,
            mock_tokens: 16,
        }
    }
}

impl ProviderConfig {
    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The first-token timeout.
    pub fn first_token_timeout(&self) -> Duration {
        Duration::from_millis(self.first_token_timeout_ms)
    }

    /// The total timeout.
    pub fn total_timeout(&self) -> Duration {
        Duration::from_millis(self.total_timeout_ms)
    }
}

impl LlmConfig {
    /// Checks providers, aliases and fallbacks. Returns the offending key and the reason.
    ///
    /// # Errors
    /// `(key, reason)` for the first bad value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let mut names = std::collections::HashSet::new();
        for p in &self.providers {
            if p.name.is_empty() || p.name.contains('/') || p.name.chars().any(char::is_whitespace)
            {
                return Err((
                    "llm.providers.name",
                    format!("`{}` must be non-empty, without `/` or spaces", p.name),
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err((
                    "llm.providers.name",
                    format!("`{}` is used by two providers", p.name),
                ));
            }
            if p.kind == ProviderKind::Openai {
                let ok = (p.base_url.starts_with("http://") || p.base_url.starts_with("https://"))
                    && reqwest::Url::parse(&p.base_url).is_ok();
                if !ok {
                    return Err((
                        "llm.providers.base_url",
                        format!(
                            "provider `{}`: `{}` is not an http(s) URL",
                            p.name, p.base_url
                        ),
                    ));
                }
            }
            if !p.api_key_env.is_empty()
                && !p
                    .api_key_env
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err((
                    "llm.providers.api_key_env",
                    format!(
                        "provider `{}`: must be an environment variable name",
                        p.name
                    ),
                ));
            }
            if p.models.iter().any(String::is_empty) {
                return Err((
                    "llm.providers.models",
                    format!("provider `{}`: model names must be non-empty", p.name),
                ));
            }
            for (k, v) in [
                ("llm.providers.connect_timeout_ms", p.connect_timeout_ms),
                (
                    "llm.providers.first_token_timeout_ms",
                    p.first_token_timeout_ms,
                ),
                ("llm.providers.total_timeout_ms", p.total_timeout_ms),
            ] {
                if v == 0 {
                    return Err((k, format!("provider `{}`: must be at least 1", p.name)));
                }
            }
            if !(p.mock_tokens_per_second >= 0.0 && p.mock_tokens_per_second.is_finite()) {
                return Err((
                    "llm.providers.mock_tokens_per_second",
                    format!("provider `{}`: must be 0 or positive", p.name),
                ));
            }
        }
        for (what, map) in [
            ("llm.aliases", &self.aliases),
            ("llm.fallbacks", &self.fallbacks),
        ] {
            for (k, v) in map {
                if k.is_empty() || v.is_empty() || v.iter().any(String::is_empty) {
                    return Err((
                        what,
                        format!("`{k}` must name a model and list at least one deployment"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn provider(name: &str) -> ProviderConfig {
        ProviderConfig {
            name: name.into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            ..ProviderConfig::default()
        }
    }

    #[test]
    fn rejects_bad_providers_naming_the_key() {
        let cases: Vec<(LlmConfig, &str)> = vec![
            (
                LlmConfig {
                    providers: vec![provider("a"), provider("a")],
                    ..LlmConfig::default()
                },
                "llm.providers.name",
            ),
            (
                LlmConfig {
                    providers: vec![provider("a/b")],
                    ..LlmConfig::default()
                },
                "llm.providers.name",
            ),
            (
                LlmConfig {
                    providers: vec![ProviderConfig {
                        base_url: "ftp://x".into(),
                        ..provider("a")
                    }],
                    ..LlmConfig::default()
                },
                "llm.providers.base_url",
            ),
            (
                LlmConfig {
                    providers: vec![ProviderConfig {
                        api_key_env: "sk-not-a-variable".into(),
                        ..provider("a")
                    }],
                    ..LlmConfig::default()
                },
                "llm.providers.api_key_env",
            ),
            (
                LlmConfig {
                    providers: vec![ProviderConfig {
                        first_token_timeout_ms: 0,
                        ..provider("a")
                    }],
                    ..LlmConfig::default()
                },
                "llm.providers.first_token_timeout_ms",
            ),
            (
                LlmConfig {
                    aliases: [("x".to_owned(), vec![])].into_iter().collect(),
                    ..LlmConfig::default()
                },
                "llm.aliases",
            ),
        ];
        for (cfg, key) in cases {
            assert_eq!(cfg.validate().unwrap_err().0, key);
        }
        let mock = ProviderConfig {
            kind: ProviderKind::Mock,
            base_url: String::new(),
            ..provider("m")
        };
        LlmConfig {
            providers: vec![provider("a"), mock],
            ..LlmConfig::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn loads_from_toml_through_the_hub_config() {
        let dir = std::env::temp_dir().join(format!("apex-llm-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("hub.toml");
        std::fs::write(
            &f,
            "[[llm.providers]]\nname = \"up\"\nbase_url = \"https://example.invalid/v1\"\n\
             api_key_env = \"UP_KEY\"\nmodels = [\"m1\"]\n\n[[llm.providers]]\nname = \"mock\"\n\
             kind = \"mock\"\n\n[llm.aliases]\nfast = [\"up/m1\", \"mock/mock\"]\n",
        )
        .unwrap();
        let c = crate::config::Config::load(&crate::config::Cli {
            config: Some(f.clone()),
            ..crate::config::Cli::default()
        })
        .unwrap();
        assert_eq!(c.llm.providers.len(), 2);
        assert_eq!(c.llm.providers[1].kind, ProviderKind::Mock);
        assert_eq!(c.llm.providers[0].connect_timeout_ms, 5000);
        assert_eq!(c.llm.aliases["fast"], vec!["up/m1", "mock/mock"]);
        std::fs::write(&f, "[[llm.providers]]\nname = \"x\"\nbase_url = \"nope\"\n").unwrap();
        let e = crate::config::Config::load(&crate::config::Cli {
            config: Some(f),
            ..crate::config::Cli::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("llm.providers.base_url"), "{e}");
    }
}

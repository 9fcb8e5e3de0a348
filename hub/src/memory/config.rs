//! The `[memory]` table: memory search (`/api/v1/memory…`). Environment:
//! `APEX_MEMORY__<KEY>`. Not reloadable.

use serde::{Deserialize, Serialize};

/// `[memory]`. See the README's "Memory" section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Whether conversations and saved memories are indexed and `/api/v1/memory…` serves;
    /// when false those routes answer 503 `memory_disabled` and nothing is indexed. Default
    /// true.
    pub enabled: bool,
    /// A gateway model that embeds (`POST /v1/embeddings`: the `mock`, or an OpenAI-compatible
    /// upstream's embedding model): when set, every indexed text gets a vector and queries rank
    /// the BM25 candidates by a blend of BM25 and cosine similarity (`vector_weight`). Default
    /// none: BM25 alone.
    pub embedding_model: Option<String>,
    /// Hybrid ranking: the weight of the cosine similarity (0 to 1); the normalised BM25 score
    /// has `1 - vector_weight`. Default 0.5.
    pub vector_weight: f64,
    /// Hybrid ranking: how many BM25 candidates are re-ranked (at least the query's `limit`).
    /// 1 to 10000. Default 100.
    pub candidates: usize,
    /// How long a query waits, in ms, for the index to take in what the store's feed already
    /// holds (this hub's own writes and, in shared mode, other hubs'); past it the query
    /// answers from the index as it is. At most 60000. Default 2000.
    pub query_wait_ms: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            embedding_model: None,
            vector_weight: 0.5,
            candidates: 100,
            query_wait_ms: 2000,
        }
    }
}

impl MemoryConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// `(key, reason)` for the first bad key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=1.0).contains(&self.vector_weight) {
            return Err(("memory.vector_weight", "must be 0 to 1".to_owned()));
        }
        if !(1..=10_000).contains(&self.candidates) {
            return Err(("memory.candidates", "must be 1 to 10000".to_owned()));
        }
        if self.query_wait_ms > 60_000 {
            return Err(("memory.query_wait_ms", "must be at most 60000".to_owned()));
        }
        if self
            .embedding_model
            .as_deref()
            .is_some_and(|m| m.trim().is_empty())
        {
            return Err(("memory.embedding_model", "must not be empty".to_owned()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ranges_are_checked() {
        assert_eq!(MemoryConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut MemoryConfig)| {
            let mut c = MemoryConfig::default();
            f(&mut c);
            c.validate().map_err(|(k, _)| k)
        };
        assert_eq!(bad(|c| c.vector_weight = 1.5), Err("memory.vector_weight"));
        assert_eq!(bad(|c| c.candidates = 0), Err("memory.candidates"));
        assert_eq!(
            bad(|c| c.query_wait_ms = 60_001),
            Err("memory.query_wait_ms")
        );
        assert_eq!(
            bad(|c| c.embedding_model = Some(" ".to_owned())),
            Err("memory.embedding_model")
        );
        let c: crate::config::Config =
            toml_like(r#"{"memory": {"embedding_model": "mock", "vector_weight": 0.3}}"#);
        assert_eq!(c.memory.embedding_model.as_deref(), Some("mock"));
        assert!(c.validate().is_ok());
    }

    fn toml_like(json: &str) -> crate::config::Config {
        serde_json::from_str(json).unwrap_or_default()
    }
}

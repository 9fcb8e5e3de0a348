//! The live configuration: a `watch` channel of `Arc<Config>` that every subsystem can read
//! ([`LiveConfig::current`]) or subscribe to ([`LiveConfig::subscribe`]), and the rules for
//! changing it while the hub runs.
//!
//! A change (`PUT /v1/config` with a partial config object, or `POST /v1/config/reload`
//! re-reading the file and environment the hub was started with) is applied all or nothing:
//! the candidate must parse, pass [`Config::validate`], change only keys listed in
//! [`HOT_RELOADABLE`], and pass every registered apply hook (the log level hook swaps the
//! `tracing` filter). Otherwise nothing changes and the error names the field.
//!
//! To make a new key hot-reloadable (for example `providers` or `quotas`), add its name to
//! [`HOT_RELOADABLE`] and have its subsystem read `current()` or watch `subscribe()`.

use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;

use crate::config::{Cli, Config, ensure_keys};

/// Config keys that may change while the hub runs. Every other key is fixed at start.
pub const HOT_RELOADABLE: &[&str] = &[
    "heartbeat_interval_ms",
    "heartbeat_timeout_ms",
    "log_level",
    "offline_node_retention_ms",
    "llm",
    "node_llm",
    "rate_limits",
];

/// Keys whose values are secrets: shown as [`REDACTED`] by `GET /v1/config`.
pub const SECRET_KEYS: &[&str] = &["api_keys", "node_keys"];

/// What a secret looks like in `GET /v1/config`. Sending it back in a `PUT` means "unchanged".
pub const REDACTED: &str = "<redacted>";

/// Applies a changed config to something outside the watch channel (e.g. the log filter).
/// Gets the candidate; an `Err((field, reason))` rejects the whole change.
pub type ApplyHook = Box<dyn Fn(&Config) -> Result<(), (String, String)> + Send + Sync>;

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// A field is unknown, malformed, out of range, or not hot-reloadable.
    #[error("`{field}`: {reason}")]
    Field {
        /// The config key at fault.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The hub cannot reload from a file (started without one).
    #[error("{0}")]
    NoSource(String),
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> ChangeError {
    ChangeError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Shared handle on the live configuration; clone freely.
#[derive(Clone)]
pub struct LiveConfig {
    inner: Arc<Inner>,
}

struct Inner {
    tx: watch::Sender<Arc<Config>>,
    /// The flags the hub was started with (`--config FILE` and overrides), for reload.
    cli: Option<Cli>,
    hooks: Mutex<Vec<ApplyHook>>,
    /// Serializes changes so two concurrent PUTs cannot interleave.
    change: Mutex<()>,
}

impl LiveConfig {
    /// A live config starting at `config`. `cli` is what `POST /v1/config/reload` re-reads
    /// (`None`: reload is refused).
    pub fn new(config: Arc<Config>, cli: Option<Cli>) -> Self {
        let (tx, _) = watch::channel(config);
        Self {
            inner: Arc::new(Inner {
                tx,
                cli,
                hooks: Mutex::new(Vec::new()),
                change: Mutex::new(()),
            }),
        }
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<Config> {
        self.inner.tx.borrow().clone()
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.inner.tx.subscribe()
    }

    /// Registers a hook run (in registration order) on every candidate before it is applied.
    pub fn on_change(&self, hook: ApplyHook) {
        self.inner.hooks.lock().push(hook);
    }

    /// The config as JSON with secrets replaced by [`REDACTED`].
    pub fn redacted(&self) -> Value {
        redact(&self.current())
    }

    /// Applies a partial config object (`{"log_level": "debug", ...}`). Returns the keys that
    /// changed.
    ///
    /// # Errors
    /// [`ChangeError::Field`] naming the first bad field; nothing is applied.
    pub fn patch(&self, patch: &Value) -> Result<Vec<String>, ChangeError> {
        let Value::Object(patch) = patch else {
            return Err(field_err("body", "must be a JSON object of config keys"));
        };
        let _guard = self.inner.change.lock();
        let current = self.current();
        let mut merged = match serde_json::to_value(&*current) {
            Ok(Value::Object(m)) => m,
            _ => return Err(field_err("body", "cannot encode the current config")),
        };
        let base = merged.clone();
        for (k, v) in patch {
            if SECRET_KEYS.contains(&k.as_str()) && is_redacted(v) {
                continue;
            }
            if !merged.contains_key(k) {
                return Err(field_err(k.clone(), "unknown config key"));
            }
            merged.insert(k.clone(), v.clone());
        }
        let candidate: Config = serde_json::from_value(Value::Object(merged)).map_err(|e| {
            // serde's message rarely names the field: find the key that breaks on its own.
            let culprit = patch.iter().find(|(k, v)| {
                let mut one = base.clone();
                one.insert((*k).clone(), (*v).clone());
                serde_json::from_value::<Config>(Value::Object(one)).is_err()
            });
            let field = culprit.map_or_else(|| "body".to_owned(), |(k, _)| k.clone());
            field_err(field, e.to_string())
        })?;
        self.apply(&current, candidate)
    }

    /// Re-reads the config file, `APEX_*` variables and flags the hub was started with, and
    /// applies the result. Returns the keys that changed.
    ///
    /// # Errors
    /// [`ChangeError::NoSource`] without a config file; [`ChangeError::Field`] for a bad or
    /// fixed key.
    pub fn reload(&self) -> Result<Vec<String>, ChangeError> {
        let Some(cli) = self.inner.cli.clone().filter(|c| c.config.is_some()) else {
            return Err(ChangeError::NoSource(
                "the hub was started without --config FILE: nothing to reload".to_owned(),
            ));
        };
        let _guard = self.inner.change.lock();
        let current = self.current();
        let mut candidate = Config::load(&cli).map_err(|e| match e {
            crate::config::Error::Invalid { field, reason } => field_err(field, reason),
            other => field_err("config", other.to_string()),
        })?;
        // Generated keys live in the data dir; a file without keys means those again.
        ensure_keys(&mut candidate).map_err(|e| field_err("data_dir", e.to_string()))?;
        self.apply(&current, candidate)
    }

    fn apply(&self, current: &Config, candidate: Config) -> Result<Vec<String>, ChangeError> {
        candidate.validate().map_err(|e| match e {
            crate::config::Error::Invalid { field, reason } => field_err(field, reason),
            other => field_err("config", other.to_string()),
        })?;
        let changed = changed_keys(current, &candidate);
        if let Some(fixed) = changed
            .iter()
            .find(|k| !HOT_RELOADABLE.contains(&k.as_str()))
        {
            return Err(field_err(
                fixed.clone(),
                format!(
                    "cannot change while the hub runs (hot-reloadable keys: {}); restart the hub",
                    HOT_RELOADABLE.join(", ")
                ),
            ));
        }
        if changed.is_empty() {
            return Ok(changed);
        }
        for hook in self.inner.hooks.lock().iter() {
            hook(&candidate).map_err(|(f, r)| field_err(f, r))?;
        }
        self.inner.tx.send_replace(Arc::new(candidate));
        tracing::info!(keys = ?changed, "configuration changed");
        Ok(changed)
    }
}

fn is_redacted(v: &Value) -> bool {
    match v {
        Value::String(s) => s == REDACTED,
        Value::Array(a) => a.iter().all(|x| x.as_str() == Some(REDACTED)),
        _ => false,
    }
}

/// `config` as JSON with every secret replaced by [`REDACTED`].
pub fn redact(config: &Config) -> Value {
    let mut v = serde_json::to_value(config).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        for k in SECRET_KEYS {
            if let Some(x) = m.get_mut(*k) {
                *x = match x {
                    Value::Array(a) => Value::Array(a.iter().map(|_| REDACTED.into()).collect()),
                    Value::Null => Value::Null,
                    _ => Value::String(REDACTED.to_owned()),
                };
            }
        }
    }
    v
}

/// Top-level keys whose values differ, in field order.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["config".to_owned()];
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn live() -> LiveConfig {
        let c = Config {
            api_keys: vec!["api-key-123".into()],
            node_keys: vec!["node-key-123".into()],
            ..Config::default()
        };
        LiveConfig::new(Arc::new(c), None)
    }

    #[test]
    fn hot_keys_change_and_subscribers_see_it() {
        let l = live();
        let mut rx = l.subscribe();
        let changed = l
            .patch(&json!({"heartbeat_interval_ms": 200, "heartbeat_timeout_ms": 900}))
            .unwrap();
        assert_eq!(changed, ["heartbeat_interval_ms", "heartbeat_timeout_ms"]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().heartbeat_timeout_ms, 900);
    }

    #[test]
    fn fixed_unknown_and_invalid_keys_are_refused_by_name() {
        let l = live();
        let e = l.patch(&json!({"listen": "127.0.0.1:1"})).unwrap_err();
        assert!(e.to_string().contains("`listen`"), "{e}");
        let e = l.patch(&json!({"no_such": 1})).unwrap_err();
        assert!(e.to_string().contains("`no_such`"), "{e}");
        let e = l.patch(&json!({"heartbeat_timeout_ms": 5})).unwrap_err();
        assert!(e.to_string().contains("`heartbeat_timeout_ms`"), "{e}");
        let e = l
            .patch(&json!({"log_level": "info", "heartbeat_interval_ms": "fast"}))
            .unwrap_err();
        assert!(e.to_string().contains("`heartbeat_interval_ms`"), "{e}");
        let e = l.patch(&json!({"log_level": "info,[[["})).unwrap_err();
        assert!(e.to_string().contains("`log_level`"), "{e}");
        assert_eq!(l.current().heartbeat_timeout_ms, 3000);
    }

    #[test]
    fn secrets_are_redacted_and_round_trip_unchanged() {
        let l = live();
        let shown = l.redacted();
        assert_eq!(shown["api_keys"], json!([REDACTED]));
        assert!(!shown.to_string().contains("api-key-123"));
        // GET, edit one hot key, PUT everything back.
        let mut body = shown.clone();
        body["log_level"] = json!("debug");
        assert_eq!(l.patch(&body).unwrap(), ["log_level"]);
        assert_eq!(l.current().api_keys, ["api-key-123"]);
    }

    #[test]
    fn a_failing_hook_applies_nothing() {
        let l = live();
        l.on_change(Box::new(|c| {
            if c.log_level == "trace" {
                Err(("log_level".into(), "refused by hook".into()))
            } else {
                Ok(())
            }
        }));
        assert!(l.patch(&json!({"log_level": "trace"})).is_err());
        assert_eq!(l.current().log_level, "info");
    }
}

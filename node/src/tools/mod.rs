//! Built-in tools and their registry. Each tool parses its arguments with serde into a struct
//! whose JSON Schema (derived with schemars) is what the node declares, so the declared schema
//! and the parser cannot drift apart.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use apex_protocol::{ToolDescription, ToolSpec};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::Config;

pub mod agent;
pub mod basic;
pub mod files;
pub mod http;
pub mod llm;
pub mod netpolicy;
pub mod shell;
pub mod system;

/// Why a tool failed. [`Error::code`] is the `error.code` of the task result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The arguments do not match the tool's schema or are out of range.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The arguments name something the node's configuration does not allow (a path outside
    /// the file roots, a program not on the allow-list).
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// The tool ran and failed.
    #[error("{0}")]
    Failed(String),
    /// The tool ran past a budget of its own (a plugin's manifest timeout); the task ends
    /// `timed_out`.
    #[error("{0}")]
    Timeout(String),
    /// The registry could not be built.
    #[error("cannot set up tools: {0}")]
    Setup(String),
}

impl Error {
    /// The `error.code` reported for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidArguments(_) => apex_protocol::codes::INVALID_ARGUMENTS,
            Error::AccessDenied(_) => "access_denied",
            Error::Timeout(_) => apex_protocol::codes::TASK_TIMEOUT,
            Error::Failed(_) | Error::Setup(_) => apex_protocol::codes::TASK_EXECUTION_FAILED,
        }
    }
}

/// The future a tool call returns.
pub type ToolFuture = Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>;

/// Reports a running task's progress to the hub (`task_progress`) and streams its output
/// (`task_stream`).
pub trait ProgressSink: Send + Sync {
    /// `percent` is clamped to 0-100.
    fn report(&self, percent: f64, message: Option<String>);

    /// Sends one chunk of the task's streamed output (a JSON object) as `task_stream`, in
    /// order, numbered from 0; every chunk reaches the hub before the task's result. Chunks
    /// sent while the node is disconnected are dropped. Default: dropped.
    fn chunk(&self, _chunk: Value) {}
}

/// What a tool call gets besides its arguments.
#[derive(Clone)]
pub struct ToolContext {
    /// Where to report progress.
    pub progress: Arc<dyn ProgressSink>,
    /// The task's id (`task_assign.taskId`; empty in a detached context).
    pub task_id: String,
    /// Where an asynchronous plugin sends its result: `task_assign.metadata.callback`, when
    /// the hub set a well-formed one.
    pub callback: Option<Callback>,
}

impl ToolContext {
    /// A context whose progress reports go nowhere (tests, benchmarks), with no task id and no
    /// callback.
    pub fn detached() -> Self {
        struct Nowhere;
        impl ProgressSink for Nowhere {
            fn report(&self, _: f64, _: Option<String>) {}
        }
        Self {
            progress: Arc::new(Nowhere),
            task_id: String::new(),
            callback: None,
        }
    }
}

/// The callback of an asynchronous plugin's task, as the hub puts it in
/// `task_assign.metadata.callback`: `{"url": "http://…/plugin-callback/<plugin>/<taskId>?token=…",
/// "secret": "<hex signing key>"}`. The plugin gets them as `APEX_CALLBACK_URL` and
/// `APEX_CALLBACK_SECRET`. The secret is never logged (`Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct Callback {
    /// Where the plugin `POST`s its result.
    pub url: String,
    /// The key the plugin signs its callback with (HMAC-SHA256 over `<timestamp>.<body>`).
    pub secret: String,
}

impl Callback {
    /// Reads `metadata.callback`: `None` if absent or ill-formed (`url` not an `http://` or
    /// `https://` string, `secret` not a string, either holding a NUL byte).
    pub fn from_metadata(metadata: Option<&Value>) -> Option<Self> {
        let cb = metadata?.get("callback")?;
        let url = cb.get("url")?.as_str()?;
        let secret = cb.get("secret")?.as_str()?;
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && !url.contains('\0')
            && !secret.contains('\0');
        ok.then(|| Self {
            url: url.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl std::fmt::Debug for Callback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callback")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A tool the node offers: a built-in, or one loaded at start (a plugin, an MCP server's
/// tool), so names are not static.
pub trait Tool: Send + Sync + 'static {
    /// Name, unique within the node.
    fn name(&self) -> &str;
    /// What it does, one sentence.
    fn description(&self) -> &str;
    /// JSON Schema of the arguments.
    fn parameters(&self) -> Value;
    /// Example calls, declared in `ToolDescription.examples`. Default: none.
    fn examples(&self) -> Vec<Value> {
        Vec::new()
    }
    /// The manifest metadata of a plugin tool, declared in `ToolDescription.plugin`.
    /// Default: not a plugin.
    fn plugin(&self) -> Option<apex_protocol::PluginInfo> {
        None
    }
    /// Runs the tool. Dropping the future aborts the work (and kills any child process).
    fn call(&self, args: Value, ctx: ToolContext) -> ToolFuture;
}

/// Parses tool arguments, which must be a JSON object; `null` (no arguments) counts as `{}`.
///
/// # Errors
/// [`Error::InvalidArguments`] with serde's account of the problem, e.g.
/// ``unknown field `x`, expected `ms` `` or ``missing field `ms` ``.
pub fn parse_args<T: DeserializeOwned>(args: Value) -> Result<T, Error> {
    let args = match args {
        Value::Null => Value::Object(serde_json::Map::new()),
        Value::Object(_) => args,
        other => {
            return Err(Error::InvalidArguments(format!(
                "arguments must be a JSON object, got {}",
                json_kind(&other)
            )));
        }
    };
    serde_json::from_value(args).map_err(|e| Error::InvalidArguments(e.to_string()))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The JSON Schema of `T`, as declared to the hub.
pub fn schema_of<T: JsonSchema>() -> Value {
    schemars::schema_for!(T).to_value()
}

/// The tools a node offers, by name.
#[derive(Clone, Default)]
pub struct Registry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in tools, as allowed by `config`: `file_read` and `file_list` only with file
    /// roots, `shell` only with an allow-list.
    ///
    /// # Errors
    /// [`Error::Setup`] if the HTTP client cannot be built.
    pub fn builtin(config: &Config) -> Result<Self, Error> {
        let mut r = Self::new();
        r.add(basic::Echo);
        r.add(basic::Noop);
        r.add(basic::Sleep);
        r.add(http::HttpFetch::new(
            config.http_fetch_max_body_bytes,
            config.http_fetch_policy.clone(),
        )?);
        let roots = files::FileRoots::new(config.file_roots.clone());
        r.add(files::Sha256::new(roots.clone()));
        if !roots.is_empty() {
            r.add(files::FileRead::new(roots.clone()));
            r.add(files::FileList::new(roots));
        }
        r.add(system::SystemInfo);
        if !config.allow_programs.is_empty() {
            r.add(shell::Shell::new(config.allow_programs.clone()));
        }
        Ok(r)
    }

    /// Adds (or replaces) a tool.
    pub fn add(&mut self, tool: impl Tool) {
        self.add_shared(Arc::new(tool));
    }

    /// Adds (or replaces) a tool already behind an `Arc`.
    pub fn add_shared(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.name().to_owned(), tool);
    }

    /// The tool named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Tool>> {
        self.tools.get(name).cloned()
    }

    /// Tool names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    /// Tool declarations for `node_register.tools`.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools
            .values()
            .map(|t| {
                ToolSpec::Described(ToolDescription {
                    examples: t.examples(),
                    plugin: t.plugin().map(Box::new),
                    ..ToolDescription::new(
                        t.name(),
                        Some(t.description().to_owned()),
                        Some(t.parameters()),
                    )
                })
            })
            .collect()
    }
}

/// Encodes bytes for a JSON answer: UTF-8 text as is (`"utf8"`), anything else as base64
/// (`"base64"`). A multi-byte character cut at the end by a size cap is dropped.
pub(crate) fn encode_bytes(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(e) if e.error_len().is_none() => {
            // Only an incomplete character at the very end: cut it.
            let valid = &bytes[..e.valid_up_to()];
            (String::from_utf8_lossy(valid).into_owned(), "utf8")
        }
        Err(_) => {
            use base64::Engine as _;
            (
                base64::engine::general_purpose::STANDARD.encode(bytes),
                "base64",
            )
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn config(roots: Vec<std::path::PathBuf>, programs: Vec<String>) -> Config {
        RawConfig {
            hub: vec!["ws://127.0.0.1:1".into()],
            key: Some("k".into()),
            file_roots: roots,
            allow_programs: programs,
            ..RawConfig::default()
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn registry_offers_only_what_config_allows() {
        let r = Registry::builtin(&config(vec![], vec![])).unwrap();
        assert_eq!(
            r.names(),
            vec![
                "echo",
                "http_fetch",
                "noop",
                "sha256",
                "sleep",
                "system_info"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::builtin(&config(vec![dir.path().into()], vec!["echo".into()])).unwrap();
        for t in ["file_read", "file_list", "shell"] {
            assert!(r.get(t).is_some(), "{t}");
        }
    }

    #[test]
    fn every_tool_declares_an_object_schema() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::builtin(&config(vec![dir.path().into()], vec!["true".into()])).unwrap();
        for spec in r.specs() {
            let ToolSpec::Described(d) = spec else {
                panic!("bare tool name")
            };
            let p = d.parameters.unwrap();
            assert!(p.is_object() || p.is_boolean(), "{}: {p}", d.name);
            assert!(!d.description.unwrap().is_empty());
        }
        let ToolSpec::Described(sleep) =
            r.specs().into_iter().find(|s| s.name() == "sleep").unwrap()
        else {
            panic!()
        };
        let p = sleep.parameters.unwrap();
        assert_eq!(p["properties"]["ms"]["maximum"], 3_600_000);
        assert_eq!(p["additionalProperties"], false);
        assert_eq!(p["required"], serde_json::json!(["ms"]));
    }

    #[test]
    fn the_callback_is_read_from_the_metadata() {
        let md = serde_json::json!({"traceparent": "x", "callback": {"url": "http://h:1/plugin-callback/p/t?token=a", "secret": "beef"}});
        let cb = Callback::from_metadata(Some(&md)).unwrap();
        assert_eq!(cb.url, "http://h:1/plugin-callback/p/t?token=a");
        assert_eq!(cb.secret, "beef");
        assert!(!format!("{cb:?}").contains("beef"));
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"callback": "http://h"}),
            serde_json::json!({"callback": {"url": "ftp://h", "secret": "s"}}),
            serde_json::json!({"callback": {"url": "http://h"}}),
            serde_json::json!({"callback": {"url": "http://h", "secret": 5}}),
        ] {
            assert_eq!(Callback::from_metadata(Some(&bad)), None, "{bad}");
        }
        assert_eq!(Callback::from_metadata(None), None);
    }

    #[test]
    fn bytes_are_encoded_as_text_or_base64() {
        assert_eq!(encode_bytes(b"hello"), ("hello".into(), "utf8"));
        let cut = &"é".as_bytes()[..1];
        assert_eq!(encode_bytes(&[b"ab", cut].concat()), ("ab".into(), "utf8"));
        assert_eq!(encode_bytes(&[0xff, 0x00, 0x41]).1, "base64");
    }
}

//! Node configuration: defaults, then a TOML file, then `APEX_NODE_*` environment variables,
//! then command-line flags, merged with figment and validated once into [`Config`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri};

/// Prefix of the environment variables that configure the node.
pub const ENV_PREFIX: &str = "APEX_NODE_";
/// Default of [`RawConfig::drain_timeout_ms`].
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Default of [`RawConfig::http_fetch_max_body_bytes`] (1 MiB).
pub const DEFAULT_HTTP_FETCH_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// Default of [`RawConfig::default_task_timeout_ms`] (the hub's default task timeout).
pub const DEFAULT_TASK_TIMEOUT_MS: u64 = 300_000;
/// Default of [`RawConfig::log_level`].
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Path the node connects to when a hub URL has none.
pub const DEFAULT_HUB_PATH: &str = "/distributed-server";
/// The `hub` value that finds the hub on the local network over mDNS (see
/// [`crate::discovery`]).
pub const HUB_AUTO: &str = "auto";
/// Default of [`RawConfig::discovery_timeout_ms`].
pub const DEFAULT_DISCOVERY_TIMEOUT_MS: u64 = 5_000;
const MAX_DISCOVERY_TIMEOUT_MS: u64 = 600_000;

const MAX_CONCURRENT_TASKS_LIMIT: u32 = 100_000;
const MAX_DRAIN_TIMEOUT_MS: u64 = 24 * 3_600_000;
const MAX_HTTP_BODY_LIMIT: u64 = 1024 * 1024 * 1024;
const MAX_NAME_CHARS: usize = 128;

/// Why the configuration was rejected. Each message fits on one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file, an environment variable or a flag could not be read or has the wrong type.
    #[error("{0}")]
    Load(String),
    /// A value was read but is not acceptable.
    #[error("{field}: {reason}")]
    Invalid {
        /// The offending setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Settings as written in `node.toml`, `APEX_NODE_*` variables or flags, before defaults and
/// validation. Every field is optional; a later layer replaces an earlier one field by field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Hub WebSocket URLs (`ws://` or `wss://`; `http(s)://` is accepted and converted), tried
    /// in turn when a connection fails. A URL without a path gets `/distributed-server`. A
    /// single string is accepted as a one-element list. `auto` (alone) finds the hub on the
    /// local network over mDNS (a hub with `discovery = true`) before every connection.
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub hub: Vec<String>,
    /// Node key, sent as `Authorization: Bearer <key>`. Required.
    #[serde(
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub key: Option<String>,
    /// Display name of the node (default: the host name).
    #[serde(
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<String>,
    /// How many tasks run at once (default: number of CPUs × 4, at least 4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_tasks: Option<u32>,
    /// Directory for the node's state, e.g. its persistent id in `node-id` (default:
    /// `$XDG_DATA_HOME/apex-node`, else `~/.local/share/apex-node`, else `./.apex-node`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Directories the file tools (`file_read`, `file_list`, `sha256` with `path`) may touch.
    /// Empty: `file_read` and `file_list` are not offered.
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub file_roots: Vec<PathBuf>,
    /// Programs the `shell` tool may run (exact names or paths). Empty: `shell` is not offered.
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub allow_programs: Vec<String>,
    /// Ask the hub for MessagePack binary frames after registration (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msgpack: Option<bool>,
    /// Log filter, e.g. `info` or `apex_node=debug,info` (default `info`).
    #[serde(
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub log_level: Option<String>,
    /// On SIGTERM/SIGINT, how long running tasks may finish before they are aborted, in
    /// milliseconds (default 30000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
    /// Largest response body `http_fetch` returns, in bytes; the rest is cut and `truncated`
    /// is set (default 1 MiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_fetch_max_body_bytes: Option<u64>,
    /// Destinations `http_fetch` may reach although the defaults refuse them (loopback,
    /// link-local and cloud metadata addresses): CIDRs, addresses, host names or
    /// `*.domain` suffixes. See `tools::netpolicy`.
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub http_fetch_allow: Vec<String>,
    /// Destinations `http_fetch` may never reach (wins over `http_fetch_allow`): CIDRs,
    /// addresses, host names or `*.domain` suffixes.
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub http_fetch_deny: Vec<String>,
    /// Time budget of a task whose `task_assign` carries no `timeout`, in milliseconds
    /// (default 300000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_task_timeout_ms: Option<u64>,
    /// Base URL of a local OpenAI-compatible server (`http(s)://HOST:PORT/v1`, e.g. Ollama's
    /// `http://127.0.0.1:11434/v1`). Its models (`GET <url>/models`) are advertised to the hub
    /// and served by the `llm.chat` tool. Unset: the node hosts no models.
    #[serde(
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub llm_upstream: Option<String>,
    /// Model that tools (`llm.summarize`) ask the hub for when their arguments name none.
    /// Unset: the hub picks (its first listed model).
    #[serde(
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub llm_model: Option<String>,
    /// Directories of plugins: every subdirectory holding a `plugin.json` or
    /// `plugin-manifest.json` is loaded as a tool at start (see `plugins`). Each must be a
    /// directory. Empty: no plugins.
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub plugin_dirs: Vec<PathBuf>,
    /// MCP servers the node starts and talks to over stdio; each server's tools are offered
    /// as `<name>.<tool>` (see [`crate::mcp`]). Config file (`[[mcp_servers]]`) or
    /// `APEX_NODE_MCP_SERVERS` only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mcp_servers: Vec<crate::mcp::ServerConfig>,
    /// With `hub = "auto"`: how long one mDNS browse waits for a hub to answer, in
    /// milliseconds, before the node says so and tries again after the reconnect backoff
    /// (default 5000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery_timeout_ms: Option<u64>,
}

/// The validated configuration the node runs with.
#[derive(Clone, PartialEq)]
pub struct Config {
    /// Hub WebSocket URLs with their path, tried in turn; empty when `discover` is set.
    pub hubs: Vec<String>,
    /// `hub = "auto"`: find the hub over mDNS before every connection attempt.
    pub discover: bool,
    /// How long one mDNS browse waits, in milliseconds.
    pub discovery_timeout_ms: u64,
    /// Node key (never logged).
    pub key: String,
    /// Display name.
    pub name: String,
    /// How many tasks run at once.
    pub max_concurrent_tasks: u32,
    /// State directory.
    pub data_dir: PathBuf,
    /// Canonical directories the file tools may touch.
    pub file_roots: Vec<PathBuf>,
    /// Programs the `shell` tool may run.
    pub allow_programs: Vec<String>,
    /// Whether to ask for MessagePack frames.
    pub msgpack: bool,
    /// Log filter.
    pub log_level: String,
    /// Drain budget on shutdown, in milliseconds.
    pub drain_timeout_ms: u64,
    /// Cap of `http_fetch` bodies, in bytes.
    pub http_fetch_max_body_bytes: u64,
    /// Where `http_fetch` may connect.
    pub http_fetch_policy: crate::tools::netpolicy::NetPolicy,
    /// Budget of tasks assigned without a timeout, in milliseconds.
    pub default_task_timeout_ms: u64,
    /// Base URL of the local OpenAI-compatible server, without a trailing `/`.
    pub llm_upstream: Option<String>,
    /// Model tools ask the hub for by default.
    pub llm_model: Option<String>,
    /// Canonical plugin directories, in the order given.
    pub plugin_dirs: Vec<PathBuf>,
    /// MCP servers to mount, validated (names unique).
    pub mcp_servers: Vec<crate::mcp::ServerConfig>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("hubs", &self.hubs)
            .field("discover", &self.discover)
            .field("discovery_timeout_ms", &self.discovery_timeout_ms)
            .field("key", &"<redacted>")
            .field("name", &self.name)
            .field("max_concurrent_tasks", &self.max_concurrent_tasks)
            .field("data_dir", &self.data_dir)
            .field("file_roots", &self.file_roots)
            .field("allow_programs", &self.allow_programs)
            .field("msgpack", &self.msgpack)
            .field("log_level", &self.log_level)
            .field("drain_timeout_ms", &self.drain_timeout_ms)
            .field("http_fetch_max_body_bytes", &self.http_fetch_max_body_bytes)
            .field("http_fetch_policy", &self.http_fetch_policy)
            .field("default_task_timeout_ms", &self.default_task_timeout_ms)
            .field("llm_upstream", &self.llm_upstream)
            .field("llm_model", &self.llm_model)
            .field("plugin_dirs", &self.plugin_dirs)
            .field("mcp_servers", &self.mcp_servers)
            .finish()
    }
}

/// Loads the configuration from the process: `file` (if any), the `APEX_NODE_*` environment
/// variables, then `flags`, and validates it.
///
/// # Errors
/// [`Error`] naming the first unreadable or invalid setting.
pub fn load(file: Option<&Path>, flags: RawConfig) -> Result<Config, Error> {
    let raw = layered(file, std::env::vars(), flags)?;
    raw.validate()
}

/// Merges the layers: `file` (TOML) < environment variables `env` (only those starting with
/// [`ENV_PREFIX`]; `APEX_NODE_CONFIG` names the file and is skipped) < `flags`.
///
/// Environment values are parsed like figment does (`[a, b]` is a list, `true` a bool, ...).
///
/// # Errors
/// [`Error::Load`] if the file is missing or malformed, or a value has the wrong type.
pub fn layered(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: RawConfig,
) -> Result<RawConfig, Error> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(Error::Load(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let mut vars: BTreeMap<String, figment::value::Value> = BTreeMap::new();
    for (k, v) in env {
        let Some(rest) = k.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = rest.to_ascii_lowercase();
        if key == "config" || key.is_empty() {
            continue;
        }
        // figment's `FromStr` for `Value` is infallible.
        let value = v
            .parse()
            .unwrap_or_else(|e: std::convert::Infallible| match e {});
        vars.insert(key, value);
    }
    figment = figment
        .merge(Layer {
            name: "APEX_NODE_* environment variables",
            data: vars,
        })
        .merge(Layer {
            name: "command-line flags",
            data: flags,
        });
    figment.extract::<RawConfig>().map_err(describe)
}

/// A configuration layer held in memory, named for error messages.
struct Layer<T> {
    name: &'static str,
    data: T,
}

impl<T: Serialize> figment::Provider for Layer<T> {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.name)
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Serialized::defaults(&self.data).data()
    }
}

/// One line: `<key>: <problem> (in <source>)`.
fn describe(e: figment::Error) -> Error {
    let key = e.path.join(".");
    let source = e.metadata.as_ref().map(|m| match &m.source {
        Some(src) => src.to_string(),
        None => m.name.to_string(),
    });
    let mut msg = if key.is_empty() {
        e.kind.to_string()
    } else {
        format!("{key}: {}", e.kind)
    };
    if let Some(source) = source {
        msg.push_str(&format!(" (in {source})"));
    }
    Error::Load(one_line(&msg))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Config {
    /// The hubs for log lines: the URLs, or `auto (mDNS _apex._tcp)`.
    pub fn hub_description(&self) -> String {
        if self.discover {
            format!("{HUB_AUTO} (mDNS {})", crate::discovery::SERVICE_TYPE)
        } else {
            self.hubs.join(", ")
        }
    }
}

impl RawConfig {
    /// Applies defaults and checks every value.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the first bad setting.
    pub fn validate(self) -> Result<Config, Error> {
        if self.hub.is_empty() {
            return Err(invalid(
                "hub",
                "at least one hub url is required (--hub ws://HOST:PORT, or --hub auto)",
            ));
        }
        let is_auto = |h: &String| h.trim().eq_ignore_ascii_case(HUB_AUTO);
        let discover = self.hub.iter().any(is_auto);
        if discover && self.hub.len() > 1 {
            return Err(invalid(
                "hub",
                "`auto` finds the hub over mDNS and cannot be combined with hub urls",
            ));
        }
        let hubs = if discover {
            Vec::new()
        } else {
            self.hub
                .iter()
                .map(|h| normalize_hub_url(h))
                .collect::<Result<Vec<_>, _>>()?
        };
        let discovery_timeout_ms = self
            .discovery_timeout_ms
            .unwrap_or(DEFAULT_DISCOVERY_TIMEOUT_MS);
        if !(100..=MAX_DISCOVERY_TIMEOUT_MS).contains(&discovery_timeout_ms) {
            return Err(invalid(
                "discovery_timeout_ms",
                format!("must be between 100 and {MAX_DISCOVERY_TIMEOUT_MS}"),
            ));
        }

        let key = self.key.unwrap_or_default();
        if key.is_empty() {
            return Err(invalid("key", "a node key is required (--key KEY)"));
        }
        if key.chars().any(|c| c.is_whitespace())
            || HeaderValue::from_str(&format!("Bearer {key}")).is_err()
        {
            return Err(invalid("key", "must be printable ascii without whitespace"));
        }

        let name = match self.name {
            Some(n) => n.trim().to_owned(),
            None => default_name(),
        };
        if name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(invalid(
                "name",
                format!("must be at most {MAX_NAME_CHARS} characters"),
            ));
        }

        let max_concurrent_tasks = self
            .max_concurrent_tasks
            .unwrap_or_else(default_max_concurrent_tasks);
        if !(1..=MAX_CONCURRENT_TASKS_LIMIT).contains(&max_concurrent_tasks) {
            return Err(invalid(
                "max_concurrent_tasks",
                format!("must be between 1 and {MAX_CONCURRENT_TASKS_LIMIT}"),
            ));
        }

        let data_dir = match self.data_dir {
            Some(d) if d.as_os_str().is_empty() => {
                return Err(invalid("data_dir", "must not be empty"));
            }
            Some(d) => d,
            None => default_data_dir(std::env::var_os("XDG_DATA_HOME"), std::env::var_os("HOME")),
        };

        let file_roots = canonical_dirs("file_roots", &self.file_roots)?;

        let mut allow_programs: Vec<String> = Vec::with_capacity(self.allow_programs.len());
        for p in &self.allow_programs {
            let p = p.trim();
            if p.is_empty() {
                return Err(invalid("allow_programs", "program names must not be empty"));
            }
            if !allow_programs.iter().any(|x| x == p) {
                allow_programs.push(p.to_owned());
            }
        }

        let log_level = self
            .log_level
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
            return Err(invalid("log_level", one_line(&e.to_string())));
        }

        let drain_timeout_ms = self.drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS);
        if drain_timeout_ms > MAX_DRAIN_TIMEOUT_MS {
            return Err(invalid(
                "drain_timeout_ms",
                format!("must be at most {MAX_DRAIN_TIMEOUT_MS}"),
            ));
        }

        let http_fetch_max_body_bytes = self
            .http_fetch_max_body_bytes
            .unwrap_or(DEFAULT_HTTP_FETCH_MAX_BODY_BYTES);
        if !(1..=MAX_HTTP_BODY_LIMIT).contains(&http_fetch_max_body_bytes) {
            return Err(invalid(
                "http_fetch_max_body_bytes",
                format!("must be between 1 and {MAX_HTTP_BODY_LIMIT}"),
            ));
        }

        let http_fetch_policy =
            crate::tools::netpolicy::NetPolicy::new(&self.http_fetch_allow, &self.http_fetch_deny)
                .map_err(|e| invalid("http_fetch_allow/http_fetch_deny", e))?;

        let default_task_timeout_ms = self
            .default_task_timeout_ms
            .unwrap_or(DEFAULT_TASK_TIMEOUT_MS);
        if default_task_timeout_ms == 0 {
            return Err(invalid("default_task_timeout_ms", "must be positive"));
        }

        let llm_upstream = match self.llm_upstream {
            None => None,
            Some(u) => Some(normalize_llm_upstream(&u)?),
        };
        let llm_model = match self.llm_model.map(|m| m.trim().to_owned()) {
            Some(m) if m.is_empty() => return Err(invalid("llm_model", "must not be empty")),
            other => other,
        };
        let mcp_servers = crate::mcp::validate(self.mcp_servers)?;

        let plugin_dirs = canonical_dirs("plugin_dirs", &self.plugin_dirs)?;

        Ok(Config {
            hubs,
            discover,
            discovery_timeout_ms,
            key,
            name,
            max_concurrent_tasks,
            data_dir,
            file_roots,
            allow_programs,
            msgpack: self.msgpack.unwrap_or(false),
            log_level,
            drain_timeout_ms,
            http_fetch_max_body_bytes,
            http_fetch_policy,
            default_task_timeout_ms,
            llm_upstream,
            llm_model,
            plugin_dirs,
            mcp_servers,
        })
    }
}

/// `dirs` made canonical, each checked to be a directory, duplicates dropped (first kept).
///
/// # Errors
/// [`Error::Invalid`] on `field` naming the first path that cannot be resolved or is not a
/// directory.
fn canonical_dirs(field: &'static str, dirs: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let canonical = std::fs::canonicalize(dir)
            .map_err(|e| invalid(field, format!("cannot use {}: {e}", dir.display())))?;
        if !canonical.is_dir() {
            return Err(invalid(
                field,
                format!("{} is not a directory", dir.display()),
            ));
        }
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(out)
}

/// Checks an `llm_upstream` URL: absolute `http://` or `https://` with a host, no credentials;
/// a trailing `/` is removed.
///
/// # Errors
/// [`Error::Invalid`] on `llm_upstream` otherwise.
pub fn normalize_llm_upstream(url: &str) -> Result<String, Error> {
    let url = url.trim();
    let bad = |reason: &str| invalid("llm_upstream", format!("`{url}` {reason}"));
    let uri: Uri = url.parse().map_err(|_| bad("is not a url"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("must start with http:// or https://")),
    }
    match uri.authority() {
        Some(a) if !a.host().is_empty() && !a.as_str().contains('@') => {}
        Some(a) if a.as_str().contains('@') => return Err(bad("must not carry credentials")),
        _ => return Err(bad("has no host")),
    }
    if uri.query().is_some() {
        return Err(bad("must not have a query"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Checks a hub URL and gives it the default path when it has none.
///
/// `http://` and `https://` become `ws://` and `wss://`.
///
/// # Errors
/// [`Error::Invalid`] for anything but an absolute ws/wss/http/https URL with a host.
pub fn normalize_hub_url(url: &str) -> Result<String, Error> {
    let bad = |reason: &str| invalid("hub", format!("`{url}` {reason}"));
    let uri: Uri = url.trim().parse().map_err(|_| bad("is not a url"))?;
    let scheme = match uri.scheme_str() {
        Some("ws") | Some("http") => "ws",
        Some("wss") | Some("https") => "wss",
        Some(_) => return Err(bad("must use ws:// or wss://")),
        None => return Err(bad("must start with ws:// or wss://")),
    };
    let authority = match uri.authority() {
        Some(a) if !a.host().is_empty() => a.as_str(),
        _ => return Err(bad("has no host")),
    };
    if authority.contains('@') {
        return Err(bad("must not carry credentials; use --key"));
    }
    let path = uri.path();
    let path = if path.is_empty() || path == "/" {
        DEFAULT_HUB_PATH
    } else {
        path
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok(format!("{scheme}://{authority}{path}{query}"))
}

/// Default concurrency: number of CPUs × 4, at least 4.
pub fn default_max_concurrent_tasks() -> u32 {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    u32::try_from(cpus.saturating_mul(4))
        .unwrap_or(u32::MAX)
        .clamp(4, MAX_CONCURRENT_TASKS_LIMIT)
}

/// Default state directory from `$XDG_DATA_HOME` and `$HOME`: `$XDG_DATA_HOME/apex-node`, else
/// `$HOME/.local/share/apex-node`, else `./.apex-node`. Relative values are ignored, as the XDG
/// specification says.
pub fn default_data_dir(xdg_data_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(xdg) = absolute(xdg_data_home) {
        return xdg.join("apex-node");
    }
    if let Some(home) = absolute(home) {
        return home.join(".local").join("share").join("apex-node");
    }
    PathBuf::from(".apex-node")
}

fn default_name() -> String {
    sysinfo::System::host_name()
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "apex-node".to_owned())
}

/// Accepts `x` or `[x, ...]`.
fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match OneOrMany::<T>::deserialize(d)? {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
    })
}

/// Accepts a string, or a number or bool written where a string was meant (an environment
/// variable `APEX_NODE_KEY=12345` parses as a number).
fn lenient_string<'de, D>(d: D) -> Result<Option<String>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        Str(String),
        Int(i64),
        UInt(u64),
        Float(f64),
        Bool(bool),
    }
    Ok(Some(match Lenient::deserialize(d)? {
        Lenient::Str(s) => s,
        Lenient::Int(n) => n.to_string(),
        Lenient::UInt(n) => n.to_string(),
        Lenient::Float(n) => n.to_string(),
        Lenient::Bool(b) => b.to_string(),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn minimal() -> RawConfig {
        RawConfig {
            hub: vec!["ws://127.0.0.1:9000".into()],
            key: Some("k".into()),
            ..RawConfig::default()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn llm_keys_are_checked() {
        let c = minimal().validate().unwrap();
        assert_eq!((c.llm_upstream, c.llm_model), (None, None));
        let c = RawConfig {
            llm_upstream: Some("http://127.0.0.1:11434/v1/".into()),
            llm_model: Some(" llama3 ".into()),
            ..minimal()
        }
        .validate()
        .unwrap();
        assert_eq!(c.llm_upstream.as_deref(), Some("http://127.0.0.1:11434/v1"));
        assert_eq!(c.llm_model.as_deref(), Some("llama3"));
        for bad in [
            "ws://h/v1",
            "127.0.0.1:11434",
            "http://u:p@h/v1",
            "http://h/v1?x=1",
            "http:///v1",
        ] {
            let e = RawConfig {
                llm_upstream: Some(bad.into()),
                ..minimal()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("llm_upstream"), "{bad}: {e}");
        }
        let e = RawConfig {
            llm_model: Some("  ".into()),
            ..minimal()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("llm_model"), "{e}");
    }

    #[test]
    fn defaults_apply() {
        let c = minimal().validate().unwrap();
        assert_eq!(c.hubs, vec!["ws://127.0.0.1:9000/distributed-server"]);
        assert_eq!(c.drain_timeout_ms, DEFAULT_DRAIN_TIMEOUT_MS);
        assert_eq!(c.http_fetch_max_body_bytes, 1024 * 1024);
        assert!(c.max_concurrent_tasks >= 4);
        assert!(!c.msgpack);
        assert!(!c.name.is_empty());
        assert!(
            !format!("{c:?}").contains("\"k\""),
            "key must not be printed"
        );
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "hub = \"ws://file:1\"\nkey = \"filekey\"\nname = \"from-file\"\n\
             max_concurrent_tasks = 3\ndrain_timeout_ms = 100\n",
        )
        .unwrap();
        let raw = layered(
            Some(&file),
            env(&[
                ("APEX_NODE_NAME", "from-env"),
                ("APEX_NODE_MAX_CONCURRENT_TASKS", "7"),
                ("APEX_NODE_KEY", "12345"),
                ("APEX_NODE_HUB", "[ws://env:1, ws://env:2/custom]"),
                ("APEX_NODE_CONFIG", "ignored.toml"),
                ("OTHER_VAR", "ignored"),
            ]),
            RawConfig {
                max_concurrent_tasks: Some(9),
                ..RawConfig::default()
            },
        )
        .unwrap();
        let c = raw.validate().unwrap();
        assert_eq!(c.name, "from-env");
        assert_eq!(c.max_concurrent_tasks, 9);
        assert_eq!(c.key, "12345");
        assert_eq!(c.drain_timeout_ms, 100);
        assert_eq!(
            c.hubs,
            vec![
                "ws://env:1/distributed-server".to_owned(),
                "ws://env:2/custom".to_owned()
            ]
        );
    }

    #[test]
    fn single_hub_string_from_env() {
        let raw = layered(
            None,
            env(&[
                ("APEX_NODE_HUB", "ws://127.0.0.1:9000"),
                ("APEX_NODE_KEY", "k"),
            ]),
            RawConfig::default(),
        )
        .unwrap();
        assert_eq!(raw.validate().unwrap().hubs.len(), 1);
    }

    #[test]
    fn rejects_unknown_and_mistyped_settings() {
        let e = layered(None, env(&[("APEX_NODE_MAX_CONCURENT", "1")]), minimal()).unwrap_err();
        assert!(e.to_string().contains("max_concurent"), "{e}");
        let e = layered(
            None,
            env(&[("APEX_NODE_DRAIN_TIMEOUT_MS", "soon")]),
            minimal(),
        )
        .unwrap_err();
        assert!(!e.to_string().contains('\n'));
        assert!(
            layered(
                Some(Path::new("/nonexistent/node.toml")),
                env(&[]),
                minimal()
            )
            .is_err()
        );
    }

    #[test]
    fn rejects_invalid_values() {
        let cases: Vec<(RawConfig, &str)> = vec![
            (
                RawConfig {
                    hub: vec![],
                    ..minimal()
                },
                "hub",
            ),
            (
                RawConfig {
                    hub: vec!["ftp://x".into()],
                    ..minimal()
                },
                "hub",
            ),
            (
                RawConfig {
                    hub: vec!["not a url".into()],
                    ..minimal()
                },
                "hub",
            ),
            (
                RawConfig {
                    key: None,
                    ..minimal()
                },
                "key",
            ),
            (
                RawConfig {
                    key: Some("a b".into()),
                    ..minimal()
                },
                "key",
            ),
            (
                RawConfig {
                    max_concurrent_tasks: Some(0),
                    ..minimal()
                },
                "max_concurrent_tasks",
            ),
            (
                RawConfig {
                    name: Some("  ".into()),
                    ..minimal()
                },
                "name",
            ),
            (
                RawConfig {
                    file_roots: vec!["/nonexistent/root".into()],
                    ..minimal()
                },
                "file_roots",
            ),
            (
                RawConfig {
                    log_level: Some("info,[".into()),
                    ..minimal()
                },
                "log_level",
            ),
            (
                RawConfig {
                    http_fetch_max_body_bytes: Some(0),
                    ..minimal()
                },
                "http_fetch_max_body_bytes",
            ),
            (
                RawConfig {
                    allow_programs: vec![" ".into()],
                    ..minimal()
                },
                "allow_programs",
            ),
        ];
        for (raw, field) in cases {
            let e = raw.clone().validate().unwrap_err();
            assert!(
                e.to_string().starts_with(field),
                "{raw:?} gave `{e}`, expected an error about {field}"
            );
        }
    }

    #[test]
    fn hub_urls_are_normalized() {
        assert_eq!(
            normalize_hub_url("ws://h:1").unwrap(),
            "ws://h:1/distributed-server"
        );
        assert_eq!(
            normalize_hub_url("https://h/").unwrap(),
            "wss://h/distributed-server"
        );
        assert_eq!(
            normalize_hub_url("ws://h:1/abp-distributed-server/VCP_Key=x").unwrap(),
            "ws://h:1/abp-distributed-server/VCP_Key=x"
        );
        assert!(normalize_hub_url("ws://user:pw@h:1").is_err());
    }

    #[test]
    fn auto_finds_the_hub_over_mdns() {
        let c = minimal().validate().unwrap();
        assert!(!c.discover);
        assert_eq!(c.discovery_timeout_ms, DEFAULT_DISCOVERY_TIMEOUT_MS);
        for auto in ["auto", " AUTO "] {
            let c = RawConfig {
                hub: vec![auto.into()],
                ..minimal()
            }
            .validate()
            .unwrap();
            assert!(c.discover, "{auto:?}");
            assert!(c.hubs.is_empty());
        }
        // From the environment and the file, as `--hub` is.
        let raw = layered(
            None,
            env(&[
                ("APEX_NODE_HUB", "auto"),
                ("APEX_NODE_KEY", "k"),
                ("APEX_NODE_DISCOVERY_TIMEOUT_MS", "250"),
            ]),
            RawConfig::default(),
        )
        .unwrap();
        let c = raw.validate().unwrap();
        assert!(c.discover);
        assert_eq!(c.discovery_timeout_ms, 250);
        let e = RawConfig {
            hub: vec!["auto".into(), "ws://h:1".into()],
            ..minimal()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("hub") && e.contains("auto"), "{e}");
        for ms in [0, 99, 600_001] {
            let e = RawConfig {
                hub: vec!["auto".into()],
                discovery_timeout_ms: Some(ms),
                ..minimal()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("discovery_timeout_ms"), "{ms}: {e}");
        }
    }

    #[test]
    fn data_dir_defaults() {
        assert_eq!(
            default_data_dir(Some("/xdg".into()), Some("/home/u".into())),
            PathBuf::from("/xdg/apex-node")
        );
        assert_eq!(
            default_data_dir(Some("relative".into()), Some("/home/u".into())),
            PathBuf::from("/home/u/.local/share/apex-node")
        );
        assert_eq!(default_data_dir(None, None), PathBuf::from(".apex-node"));
    }

    #[test]
    fn http_fetch_policy_entries_are_validated() {
        let c = RawConfig {
            http_fetch_allow: vec!["127.0.0.1".into(), "*.lan".into()],
            http_fetch_deny: vec!["10.0.0.0/8".into()],
            ..minimal()
        }
        .validate()
        .unwrap();
        assert!(c.http_fetch_policy.check_host("nas.lan").unwrap());
        let e = RawConfig {
            http_fetch_deny: vec!["10.0.0.0/33".into()],
            ..minimal()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("http_fetch"), "{e}");
    }

    #[test]
    fn file_roots_are_canonical() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a");
        std::fs::create_dir(&sub).unwrap();
        let c = RawConfig {
            file_roots: vec![sub.join("..").join("a")],
            ..minimal()
        }
        .validate()
        .unwrap();
        assert_eq!(c.file_roots, vec![std::fs::canonicalize(&sub).unwrap()]);
    }
}

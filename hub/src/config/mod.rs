//! Hub configuration: defaults in code, then a TOML file, then `APEX_*` environment variables
//! (`__` separates nested keys), then command-line flags; validated once at start.
//!
//! Every key is documented on [`Config`]; `apex-hub --help` lists the flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A configuration that cannot be used. Printed as one line; the hub exits 64.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file, environment or flags did not parse.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of range.
    #[error("invalid configuration: `{field}` {reason}")]
    Invalid {
        /// The offending key.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The hub's settings. TOML keys and `APEX_<KEY>` variables use these field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address for HTTP and the node channel. Port 0 picks a free port. Default `127.0.0.1:8088`.
    pub listen: SocketAddr,
    /// Directory for generated keys and the embedded task store (`tasks.redb`, locked by
    /// `hub.lock` while the hub runs). Default
    /// `$XDG_DATA_HOME/apex-hub`, else `~/.local/share/apex-hub`, else `./.apex-data`.
    pub data_dir: PathBuf,
    /// API keys accepted as `Authorization: Bearer <key>` on HTTP routes. When empty, a key is
    /// generated once, saved in `<data_dir>/api-key` and printed.
    pub api_keys: Vec<String>,
    /// Keys accepted from nodes (`VCP_Key=<key>` in the path or a bearer header). When empty,
    /// one is generated, saved in `<data_dir>/node-key` and printed.
    pub node_keys: Vec<String>,
    /// How often the hub pings each node, in milliseconds. Default 1000.
    pub heartbeat_interval_ms: u64,
    /// Silence (no frame, no pong) after which a node is declared dead and its tasks migrate,
    /// in milliseconds. Must exceed the interval. Default 3000.
    pub heartbeat_timeout_ms: u64,
    /// Largest WebSocket message accepted from a node, in bytes; larger ones close the
    /// connection with 1009. Default 16 MiB.
    pub max_frame_bytes: usize,
    /// Largest HTTP request body, in bytes. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Task timeout when a submission gives none, in seconds. Default 300.
    pub default_task_timeout_seconds: f64,
    /// Longest task timeout a submission may ask for, in seconds. Default 604800 (7 days).
    pub max_task_timeout_seconds: f64,
    /// Assignments a task may use when a submission gives none. Default 3.
    pub default_max_attempts: u32,
    /// Priority when a submission gives none (higher runs first). Default 5.
    pub default_priority: i32,
    /// Concurrency limit of native nodes that declare none. Default 16.
    pub default_node_max_concurrent_tasks: u32,
    /// Concurrency limit of VCP nodes, which cannot declare one. Default 8.
    pub vcp_max_concurrent_tasks: u32,
    /// Allow dispatching the VCP built-in `internal_request_file` (reads any file on the
    /// node). Default false.
    pub allow_internal_request_file: bool,
    /// Most tasks in one `POST /api/v1/tasks/batch`. Default 1000.
    pub max_batch_tasks: usize,
    /// Capacity of each node's outbound frame queue. Default 4096.
    pub outbound_queue_frames: usize,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing filter). Default `info`.
    pub log_level: String,
    /// Log format: `text` or `json`. Default `text`.
    pub log_format: String,
    /// Task store: `embedded` (default: `<data_dir>/tasks.redb`), `memory` (lost at exit), or a
    /// Redis URL `redis://[:password@]host:port/db` (`rediss://` for TLS).
    pub store: String,
    /// `single` (default): this hub owns its store alone. `shared`: several hubs share one
    /// Redis store (`store` must be a Redis URL): tasks submitted at any hub run on nodes of
    /// any hub. Shared mode is incomplete (see ARCHITECTURE.md, "Several hubs on one Redis").
    pub hub_mode: String,
    /// Shared mode: lifetime of this hub's lease in Redis, in milliseconds. The hub renews it
    /// every `min(1000, shared_lease_ttl_ms / 5)` ms; once it has expired (the hub died or lost
    /// Redis) other hubs requeue the tasks it held. Between 500 and 600000. Default 5000.
    pub shared_lease_ttl_ms: u64,
    /// Shared mode, graceful shutdown (SIGTERM): how long the hub waits for its nodes to
    /// finish the tasks they run, in milliseconds, after handing back the tasks it holds but
    /// has not started; then it closes node connections and deletes its lease so other hubs
    /// take over what is left at once. At most 600000. Default 10000.
    pub shared_shutdown_drain_ms: u64,
    /// Graceful shutdown (SIGTERM, Ctrl-C): how long the hub keeps serving, submissions
    /// included, after `/readyz` turned 503, in milliseconds, so load balancers and Kubernetes
    /// endpoints take it out before it refuses work. Then submissions answer 503
    /// `shutting_down` and the drain begins (node connections close; in shared mode first
    /// `shared_shutdown_drain_ms`). Kubernetes' `terminationGracePeriodSeconds` must exceed
    /// this plus the drain. At most 600000. Default 5000.
    pub shutdown_delay_ms: u64,
    /// Tokio worker threads running HTTP, the node channel and the engine. 0 (the default):
    /// half the CPUs, at least one ([`Config::effective_worker_threads`]). The hub is I/O
    /// bound, and on a machine it shares with nodes, model servers or clients, fewer workers
    /// mean fewer cross-thread wake-ups: on 2 cores `scripts/bench.sh llm` measured 24.8 µs of
    /// hub CPU per proxied call with 1 worker against 31.5 µs with 2. At most 1024. Not
    /// reloadable.
    pub worker_threads: usize,
    /// Hours a finished task and its events are kept before they are collected. Default 168.
    pub task_retention_hours: u64,
    /// After a restart, how long tasks that were assigned or running wait for their node to
    /// reconnect and reclaim them before they are dispatched again, in milliseconds.
    /// Default 10000.
    pub recovery_grace_ms: u64,
    /// How long an offline node stays listed before the hub forgets it, in milliseconds; 0
    /// keeps offline nodes until they are deleted. Hot-reloadable. Default 3600000 (1 hour).
    pub offline_node_retention_ms: u64,
    /// Entries of the log channel's ring buffer, replayed to each new log client. Default 1000.
    pub log_buffer_entries: usize,
    /// Entries a log-channel client may fall behind before it skips (and counts) the oldest
    /// ones. Default 1024. (`/v1/events` clients read the engine's own buffers: 8192 task
    /// events, 1024 node events.)
    pub stream_buffer_events: usize,
    /// Optional second listener serving only `GET /metrics`, without an API key (for a
    /// Prometheus scraper on an internal network), e.g. `127.0.0.1:9090`. Default none.
    pub metrics_listen: Option<SocketAddr>,
    /// Advertise the hub on the local network over mDNS/DNS-SD (`_apex._tcp`, TXT `version`,
    /// `path`, `proto`), so `apex-node --hub auto` finds it; withdrawn on graceful shutdown. A
    /// failure to start mDNS is logged and the hub runs on. Default false (the home-hub config
    /// of `scripts/install.sh` turns it on). Not reloadable.
    pub discovery: bool,
    /// The instance name advertised with `discovery` (at most 63 bytes). Default: the host
    /// name.
    pub discovery_name: Option<String>,
    /// The hub's URL as nodes' plugins reach it (`http://` or `https://`, no path), the
    /// base of asynchronous plugins' callback URLs. Default: `http://<listen address>`
    /// (`127.0.0.1` for an unspecified address): set it when plugins run on other machines
    /// or behind a proxy.
    pub public_url: Option<String>,
    /// Server-side tools (`"server_tools"` in `POST /v1/chat/completions`): most rounds of
    /// tool runs in one chat completion; when the model still calls server tools after them,
    /// its last answer goes to the client with `apex_tool_rounds_exhausted: true`. 1 to 100.
    /// Default 8.
    pub max_tool_rounds: u32,
    /// Capacity of each client WebSocket's (`GET /ws`) outbound queue, in frames; a client
    /// that lets it fill (it stopped reading) is disconnected. 1 to 65536. Default 256.
    pub ws_queue_len: usize,
    /// Server-side tools: the timeout of each tool call's task, in seconds (greater than 0,
    /// at most `max_task_timeout_seconds`); a call that times out answers the model with an
    /// error. Default 60.
    pub tool_call_timeout_seconds: f64,
    /// LLM gateway (`[llm]`: `providers`, `aliases`, `fallbacks`); see
    /// [`LlmConfig`](crate::llm::LlmConfig). Off (no models) by default.
    pub llm: crate::llm::LlmConfig,
    /// Per-node limits on nodes' `llm_request` (`[node_llm]`: `requests_per_minute`,
    /// `tokens_per_day`, `max_concurrent_streams`; 0 is unlimited); see
    /// [`NodeLlmQuotas`](crate::llm::node_proxy::NodeLlmQuotas).
    pub node_llm: crate::llm::node_proxy::NodeLlmQuotas,
    /// Users, access tokens and refresh tokens (`[auth]`: `jwt_secret_env`,
    /// `access_token_ttl_secs`, `refresh_token_ttl_secs`; `APEX_AUTH__<KEY>`); see
    /// [`AuthConfig`]. Not reloadable.
    pub auth: AuthConfig,
    /// Per-caller rate limits of the API routes (`[rate_limits]`; `APEX_RATE_LIMITS__<KEY>`);
    /// see [`RateLimits`]. Hot-reloadable.
    pub rate_limits: RateLimits,
    /// Conversations of `/api/v1/chat` (`[chat]`; `APEX_CHAT__<KEY>`); see
    /// [`ChatConfig`](crate::chat::ChatConfig). Not reloadable.
    pub chat: crate::chat::ChatConfig,
    /// Memory search of `/api/v1/memory…` (`[memory]`; `APEX_MEMORY__<KEY>`); see
    /// [`MemoryConfig`](crate::memory::MemoryConfig). Not reloadable.
    pub memory: crate::memory::MemoryConfig,
    /// Research sessions of `/api/research/sessions…` (`[research]`;
    /// `APEX_RESEARCH__<KEY>`); see [`ResearchConfig`](crate::research::ResearchConfig). Not
    /// reloadable.
    pub research: crate::research::ResearchConfig,
    /// Agent profiles of `/api/agents/profiles` (`[agents]`; `APEX_AGENTS__<KEY>`); see
    /// [`AgentsConfig`]. Not reloadable.
    pub agents: AgentsConfig,
}

/// The `[agents]` table: the models of the default agent profiles (`/api/agents/profiles`).
/// Environment: `APEX_AGENTS__<KEY>`. Not reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsConfig {
    /// The gateway model (`provider/model`, an alias or a model name) of the default
    /// profiles, and of any profile whose `role_model` is empty. Default empty: the gateway's
    /// first model at run time (the built-in `mock` on a fresh machine).
    pub role_model: String,
    /// The model asked when the role model fails, for the default profiles and any profile
    /// whose `fallback_model` is empty. Default empty: no fallback.
    pub fallback_model: String,
}

/// The `[auth]` table: how `/api/v1/auth/*` signs access tokens and how long tokens live.
///
/// The signing secret itself is never a config value (so `GET /v1/config` cannot show it):
/// it comes from the environment variable `jwt_secret_env` names, or is generated once and
/// kept in the record store, where every hub of a shared cluster finds the same one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Name of the environment variable holding the HS256 secret of access tokens (at least
    /// 32 bytes), e.g. `APEX_JWT_SECRET`. The hub does not start if it is set and the variable
    /// is missing or too short. Default none: a random secret generated once and kept in the
    /// record store (`records.redb`, or Redis), so tokens survive restarts (not with the
    /// `memory` store).
    pub jwt_secret_env: Option<String>,
    /// Lifetime of an access token (JWT), in seconds. 1 to 86400. Default 1800.
    pub access_token_ttl_secs: u64,
    /// Lifetime of a refresh token, in seconds; each refresh rotates it and starts a new
    /// lifetime. At least `access_token_ttl_secs`, at most 31536000. Default 604800 (7 days).
    pub refresh_token_ttl_secs: u64,
}

/// Shortest accepted HS256 secret, in bytes.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret_env: None,
            access_token_ttl_secs: 1800,
            refresh_token_ttl_secs: 604_800,
        }
    }
}

/// What `[rate_limits]` does when the rate-limit store (Redis, in shared mode) fails during a
/// check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Let the request through, without rate-limit headers (availability first).
    Allow,
    /// Refuse it with 503 `rate_limit_unavailable`.
    Deny,
}

/// Per-caller rate limits of the API routes (the `[rate_limits]` table, env
/// `APEX_RATE_LIMITS__<KEY>`), counted per authenticated caller (`Principal::id`) and route
/// class, with the generic cell rate algorithm: "N per minute" admits a burst of N from a full
/// bucket, then one every 60/N s. A hub alone counts in memory; hubs in shared mode count in
/// their Redis (one atomic script call per check, on Redis's clock), so a limit holds across
/// every hub. Limited responses carry `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
/// `X-RateLimit-Reset` (Unix seconds when the bucket is full again); refused ones answer 429
/// `rate_limit_exceeded` with `Retry-After` (seconds). Each `*_per_minute` is 0 for unlimited,
/// else at most 60000000 (one unit per µs). Hot-reloadable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Whether limits apply at all. Default true.
    pub enabled: bool,
    /// Whether the config file's API keys (`api_keys`, the `admin` caller) are limited too.
    /// Default false: those keys are the operator's own (scripts, dashboards, `scripts/bench.sh`,
    /// the test suite), they all count as one caller, and throttling them would make the
    /// operator's tooling fail under its own load; managed keys and users are limited.
    pub apply_to_admin: bool,
    /// Requests a minute per caller on every API route without a class of its own. A managed
    /// key's own `rate_limit` replaces it for that key. Default 100.
    pub standard_per_minute: u32,
    /// Requests a minute per caller on routes that start research runs (class `execute`).
    /// Default 10.
    pub execute_per_minute: u32,
    /// Requests a minute per caller on `/test` routes (class `test`). Default 20.
    pub test_per_minute: u32,
    /// Requests a minute per caller on `POST /v1/chat/completions` (class `llm`, instead of
    /// `standard_per_minute`); its responses also carry OpenAI's `x-ratelimit-*-requests`
    /// headers. Default 60.
    pub llm_requests_per_minute: u32,
    /// Tokens (prompt + completion, as the gateway reports the call's usage) a minute per
    /// caller on `POST /v1/chat/completions`, charged after each call: a call is refused while
    /// the caller has no token left, so the call that crosses the budget completes and the
    /// next waits until it is paid back. Carried in `x-ratelimit-*-tokens`. Default 100000.
    pub llm_tokens_per_minute: u32,
    /// Attempts a minute of `POST /api/v1/auth/login`, per email and per client address
    /// (against password guessing; applies to everyone). Default 10.
    pub login_per_minute: u32,
    /// When the store of the counts (Redis, in shared mode) fails during a check: `allow`
    /// (default; the request goes on, counted in `apex_rate_limit_store_errors_total`) or
    /// `deny` (503 `rate_limit_unavailable`).
    pub on_store_error: OnStoreError,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            apply_to_admin: false,
            standard_per_minute: 100,
            execute_per_minute: 10,
            test_per_minute: 20,
            llm_requests_per_minute: 60,
            llm_tokens_per_minute: 100_000,
            login_per_minute: 10,
            on_store_error: OnStoreError::Allow,
        }
    }
}

impl AuthConfig {
    /// Checks the values (not the variable `jwt_secret_env` names: the hub reads it at start).
    ///
    /// # Errors
    /// `(key, reason)` for a value out of range.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(name) = &self.jwt_secret_env
            && (name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err((
                "auth.jwt_secret_env",
                "must be an environment variable name (letters, digits, `_`)".to_owned(),
            ));
        }
        if !(1..=86_400).contains(&self.access_token_ttl_secs) {
            return Err((
                "auth.access_token_ttl_secs",
                "must be 1 to 86400 (one day)".to_owned(),
            ));
        }
        if self.refresh_token_ttl_secs < self.access_token_ttl_secs
            || self.refresh_token_ttl_secs > 31_536_000
        {
            return Err((
                "auth.refresh_token_ttl_secs",
                "must be at least access_token_ttl_secs and at most 31536000 (one year)".to_owned(),
            ));
        }
        Ok(())
    }

    /// The HS256 secret from the variable `jwt_secret_env` names; `Ok(None)` when
    /// `jwt_secret_env` is not set (the secret is then generated and stored).
    ///
    /// # Errors
    /// One line naming the variable when it is not set or holds fewer than
    /// [`MIN_JWT_SECRET_BYTES`] bytes (`main.rs` exits 64 with it, before listening).
    pub fn env_secret(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(name) = &self.jwt_secret_env else {
            return Ok(None);
        };
        let value = std::env::var(name).map_err(|_| {
            format!("`auth.jwt_secret_env` names the environment variable {name}, which is not set")
        })?;
        if value.len() < MIN_JWT_SECRET_BYTES {
            return Err(format!(
                "the environment variable {name} (`auth.jwt_secret_env`) must hold at least \
                 {MIN_JWT_SECRET_BYTES} bytes"
            ));
        }
        Ok(Some(value.into_bytes()))
    }

    /// The access token lifetime.
    pub fn access_ttl(&self) -> Duration {
        Duration::from_secs(self.access_token_ttl_secs)
    }

    /// The refresh token lifetime.
    pub fn refresh_ttl(&self) -> Duration {
        Duration::from_secs(self.refresh_token_ttl_secs)
    }
}

impl RateLimits {
    /// The largest `*_per_minute`: one unit per µs (the resolution of the counts).
    pub const MAX_PER_MINUTE: u32 = 60_000_000;

    /// Checks the values.
    ///
    /// # Errors
    /// `(key, reason)` for a rate above [`RateLimits::MAX_PER_MINUTE`].
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (key, v) in [
            ("rate_limits.standard_per_minute", self.standard_per_minute),
            ("rate_limits.execute_per_minute", self.execute_per_minute),
            ("rate_limits.test_per_minute", self.test_per_minute),
            (
                "rate_limits.llm_requests_per_minute",
                self.llm_requests_per_minute,
            ),
            (
                "rate_limits.llm_tokens_per_minute",
                self.llm_tokens_per_minute,
            ),
            ("rate_limits.login_per_minute", self.login_per_minute),
        ] {
            if v > Self::MAX_PER_MINUTE {
                return Err((key, "must be at most 60000000 (0: unlimited)".to_owned()));
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8088)),
            data_dir: default_data_dir(),
            api_keys: Vec::new(),
            node_keys: Vec::new(),
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 3000,
            max_frame_bytes: 16 << 20,
            max_body_bytes: 16 << 20,
            default_task_timeout_seconds: 300.0,
            max_task_timeout_seconds: 604_800.0,
            default_max_attempts: 3,
            default_priority: 5,
            default_node_max_concurrent_tasks: 16,
            vcp_max_concurrent_tasks: 8,
            allow_internal_request_file: false,
            max_batch_tasks: 1000,
            outbound_queue_frames: 4096,
            log_level: "info".to_owned(),
            log_format: "text".to_owned(),
            store: "embedded".to_owned(),
            hub_mode: "single".to_owned(),
            shared_lease_ttl_ms: crate::shared::DEFAULT_LEASE_TTL_MS,
            shared_shutdown_drain_ms: 10_000,
            shutdown_delay_ms: 5_000,
            worker_threads: 0,
            task_retention_hours: 168,
            recovery_grace_ms: 10_000,
            offline_node_retention_ms: 3_600_000,
            log_buffer_entries: 1000,
            stream_buffer_events: 1024,
            metrics_listen: None,
            discovery: false,
            discovery_name: None,
            public_url: None,
            max_tool_rounds: crate::llm::tool_loop::DEFAULT_MAX_TOOL_ROUNDS,
            ws_queue_len: 256,
            tool_call_timeout_seconds: 60.0,
            llm: crate::llm::LlmConfig::default(),
            node_llm: crate::llm::node_proxy::NodeLlmQuotas::default(),
            auth: AuthConfig::default(),
            chat: crate::chat::ChatConfig::default(),
            memory: crate::memory::MemoryConfig::default(),
            research: crate::research::ResearchConfig::default(),
            agents: AgentsConfig::default(),
            rate_limits: RateLimits::default(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("apex-hub");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(h).join(".local/share/apex-hub");
    }
    PathBuf::from(".apex-data")
}

/// Command-line flags of `apex-hub`. Each overrides the same-named config key.
#[derive(Debug, Clone, Default, Parser, Serialize)]
#[command(
    name = "apex-hub",
    version,
    about = "The apex hub: HTTP/SSE APIs for tasks and nodes, and the node channel",
    long_about = "The apex hub accepts background tasks over HTTP and dispatches them to worker \
                  and companion nodes connected over the distributed-server WebSocket channel.\n\n\
                  Settings come from defaults, then --config FILE (TOML), then APEX_* environment \
                  variables (e.g. APEX_HEARTBEAT_TIMEOUT_MS=5000, APEX_API_KEYS='[\"k1\"]'), then \
                  these flags. See the README for every key."
)]
pub struct Cli {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port) [default: 127.0.0.1:8088].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// HTTP API key (repeatable). Without any, one is generated and saved in the data dir.
    #[arg(long = "api-key", value_name = "KEY")]
    #[serde(rename = "api_keys", skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<String>,
    /// Node key (repeatable). Without any, one is generated and saved in the data dir.
    #[arg(long = "node-key", value_name = "KEY")]
    #[serde(rename = "node_keys", skip_serializing_if = "Vec::is_empty")]
    pub node_keys: Vec<String>,
    /// Data directory (generated keys; later the task store).
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Ping interval towards nodes, in milliseconds [default: 1000].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Silence after which a node is declared dead, in milliseconds [default: 3000].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Largest WebSocket message from a node, in bytes [default: 16777216].
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<usize>,
    /// Log filter, e.g. `info` or `apex_hub=debug` [default: info].
    #[arg(long, value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// Task store: embedded, memory, or redis://host:port/db [default: embedded].
    #[arg(long, value_name = "STORE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// single, or shared (several hubs on one Redis store) [default: single].
    #[arg(long, value_name = "MODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_mode: Option<String>,
    /// Shared mode: lifetime of the hub's lease in Redis, in ms [default: 5000].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_lease_ttl_ms: Option<u64>,
    /// Shared mode: how long SIGTERM waits for nodes to finish their tasks, in ms [default: 10000].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_shutdown_drain_ms: Option<u64>,
    /// On SIGTERM, how long to keep serving after /readyz turned 503, in ms [default: 5000].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_delay_ms: Option<u64>,
    /// Validate the configuration (file, environment, flags), print `configuration ok` and
    /// exit 0, or print one line and exit 64; touches no data directory, store or port.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
    /// `GET /livez` on this configuration's `listen` address (loopback when it listens on
    /// every address) and exit 0 on 200, else 1: the container image's `HEALTHCHECK`, which
    /// has no shell or curl.
    #[arg(long)]
    #[serde(skip)]
    pub healthcheck: bool,
    /// Tokio worker threads; 0: half the CPUs, at least 1 [default: 0].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    /// Hours finished tasks are kept [default: 168].
    #[arg(long, value_name = "HOURS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_retention_hours: Option<u64>,
    /// Grace period for nodes to reclaim their tasks after a restart, in ms [default: 10000].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_grace_ms: Option<u64>,
    /// Second listener serving only GET /metrics without an API key, e.g. 127.0.0.1:9090.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Advertise the hub on the local network over mDNS (_apex._tcp) for `apex-node --hub
    /// auto` [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub discovery: bool,
    /// Instance name advertised with --discovery [default: the host name].
    #[arg(long, value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery_name: Option<String>,
}

impl Config {
    /// Loads defaults, then `file`, then `APEX_*` variables, then `cli`, and validates.
    ///
    /// # Errors
    /// [`Error`] naming the bad key.
    pub fn load(cli: &Cli) -> Result<Config, Error> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = &cli.config {
            if !file.exists() {
                return Err(Error::Parse(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            fig = fig.merge(Toml::file(file));
        }
        // Only variables naming a config key: APEX_* variables of other tools are left alone.
        let known: Vec<String> = match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        fig = fig
            .merge(
                Env::prefixed("APEX_")
                    .split("__")
                    .filter(move |k| names_config_key(k.as_str(), &known)),
            )
            .merge(Serialized::defaults(cli));
        let cfg: Config = fig
            .extract()
            .map_err(|e| Error::Parse(one_line(&e.to_string())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and relations between keys.
    ///
    /// # Errors
    /// [`Error::Invalid`] for the first bad key.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason: &str| {
            Err(Error::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.heartbeat_interval_ms < 10 {
            return bad("heartbeat_interval_ms", "must be at least 10");
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            return bad(
                "heartbeat_timeout_ms",
                "must be greater than heartbeat_interval_ms",
            );
        }
        if self.max_frame_bytes < 1024 {
            return bad("max_frame_bytes", "must be at least 1024");
        }
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes", "must be at least 1024");
        }
        if !(self.default_task_timeout_seconds > 0.0
            && self.default_task_timeout_seconds <= self.max_task_timeout_seconds)
        {
            return bad(
                "default_task_timeout_seconds",
                "must be positive and at most max_task_timeout_seconds",
            );
        }
        if !(self.max_task_timeout_seconds > 0.0 && self.max_task_timeout_seconds <= 31_536_000.0) {
            return bad(
                "max_task_timeout_seconds",
                "must be positive and at most 31536000 (one year)",
            );
        }
        if self.default_max_attempts == 0 {
            return bad("default_max_attempts", "must be at least 1");
        }
        if self.default_node_max_concurrent_tasks == 0 {
            return bad("default_node_max_concurrent_tasks", "must be at least 1");
        }
        if self.vcp_max_concurrent_tasks == 0 {
            return bad("vcp_max_concurrent_tasks", "must be at least 1");
        }
        if self.max_batch_tasks == 0 {
            return bad("max_batch_tasks", "must be at least 1");
        }
        if self.outbound_queue_frames < 16 {
            return bad("outbound_queue_frames", "must be at least 16");
        }
        if let Err(reason) = crate::durable::StoreKind::parse(&self.store) {
            return bad("store", &reason);
        }
        match self.hub_mode.as_str() {
            "single" => {}
            "shared" => {
                if !matches!(self.store_kind(), crate::durable::StoreKind::Redis(_)) {
                    return bad(
                        "hub_mode",
                        "`shared` needs a Redis store (`store = \"redis://...\"`)",
                    );
                }
            }
            _ => return bad("hub_mode", "must be `single` or `shared`"),
        }
        if self.worker_threads > 1024 {
            return bad(
                "worker_threads",
                "must be at most 1024 (0: half the CPUs, at least 1)",
            );
        }
        if self.shared_shutdown_drain_ms > 600_000 {
            return bad(
                "shared_shutdown_drain_ms",
                "must be at most 600000 (ten minutes)",
            );
        }
        if self.shutdown_delay_ms > 600_000 {
            return bad("shutdown_delay_ms", "must be at most 600000 (ten minutes)");
        }
        if !(500..=600_000).contains(&self.shared_lease_ttl_ms) {
            return bad(
                "shared_lease_ttl_ms",
                "must be between 500 and 600000 (the lease is renewed every min(1000, ttl / 5) ms, well before it expires)",
            );
        }
        if !(1..=87_600).contains(&self.task_retention_hours) {
            return bad(
                "task_retention_hours",
                "must be between 1 and 87600 (ten years)",
            );
        }
        if self.recovery_grace_ms > 3_600_000 {
            return bad("recovery_grace_ms", "must be at most 3600000 (one hour)");
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad("log_format", "must be `text` or `json`");
        }
        if !(1..=1_000_000).contains(&self.log_buffer_entries) {
            return bad("log_buffer_entries", "must be 1 to 1000000");
        }
        if !(16..=1_000_000).contains(&self.stream_buffer_events) {
            return bad("stream_buffer_events", "must be 16 to 1000000");
        }
        if self
            .metrics_listen
            .is_some_and(|m| m == self.listen && m.port() != 0)
        {
            return bad("metrics_listen", "must differ from listen");
        }
        if let Some(n) = &self.discovery_name
            && (n.trim().is_empty() || n.len() > 63 || n.chars().any(char::is_control))
        {
            return bad(
                "discovery_name",
                "must be 1 to 63 bytes without control characters",
            );
        }
        if let Some(u) = &self.public_url
            && !((u.starts_with("http://") || u.starts_with("https://"))
                && u.len() > "https://".len()
                && !u.contains(char::is_whitespace))
        {
            return bad(
                "public_url",
                "must be an http:// or https:// URL, e.g. http://hub.local:8088",
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(Error::Invalid {
                field: "log_level",
                reason: e.to_string(),
            });
        }
        for k in self.api_keys.iter().chain(&self.node_keys) {
            if k.len() < 8 || k.chars().any(|c| c.is_whitespace() || c == '/') {
                return bad(
                    "api_keys/node_keys",
                    "keys must be at least 8 characters, without spaces or '/'",
                );
            }
        }
        if !(1..=100).contains(&self.max_tool_rounds) {
            return bad("max_tool_rounds", "must be 1 to 100");
        }
        if !(1..=65_536).contains(&self.ws_queue_len) {
            return bad("ws_queue_len", "must be 1 to 65536");
        }
        if !(self.tool_call_timeout_seconds > 0.0
            && self.tool_call_timeout_seconds <= self.max_task_timeout_seconds)
        {
            return bad(
                "tool_call_timeout_seconds",
                "must be positive and at most max_task_timeout_seconds",
            );
        }
        if let Err((field, reason)) = self.llm.validate() {
            return Err(Error::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.node_llm.validate() {
            return Err(Error::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.auth.validate() {
            return Err(Error::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.rate_limits.validate() {
            return Err(Error::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.chat.validate() {
            return Err(Error::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.memory.validate() {
            return Err(Error::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.research.validate() {
            return Err(Error::Invalid { field, reason });
        }
        for (field, model) in [
            ("agents.role_model", &self.agents.role_model),
            ("agents.fallback_model", &self.agents.fallback_model),
        ] {
            if model.chars().count() > 256 || model.chars().any(char::is_whitespace) {
                return Err(Error::Invalid {
                    field,
                    reason: "must be a model name of at most 256 characters, without spaces"
                        .to_owned(),
                });
            }
        }
        Ok(())
    }

    /// The ping interval.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// The silence timeout.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }

    /// Whether `hub_mode` is `shared`.
    pub fn is_shared(&self) -> bool {
        self.hub_mode == "shared"
    }

    /// How often a shared-mode hub renews its lease: `min(1 s, shared_lease_ttl_ms / 5)`.
    pub fn shared_lease_renew(&self) -> Duration {
        crate::shared::renew_interval(self.shared_lease_ttl_ms)
    }

    /// The worker thread count to start the runtime with: `worker_threads`, or when it is 0,
    /// half the CPUs this process may use (at least one).
    pub fn effective_worker_threads(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        (cpus / 2).max(1)
    }

    /// The validated `store` value.
    pub fn store_kind(&self) -> crate::durable::StoreKind {
        crate::durable::StoreKind::parse(&self.store).unwrap_or(crate::durable::StoreKind::Embedded)
    }
}

/// Whether an `APEX_` variable, prefix stripped and `__` already turned into `.` (as figment
/// hands it over, in the case it was written: `HEARTBEAT_TIMEOUT_MS`, `AUTH.JWT_SECRET_ENV`),
/// names a top-level key of `known` or a key nested in one. Compared ignoring ASCII case,
/// since variables are upper case and keys lower case.
fn names_config_key(var: &str, known: &[String]) -> bool {
    let top = var.split('.').next().unwrap_or(var);
    known.iter().any(|k| k.eq_ignore_ascii_case(top))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Which keys were generated (to print them once).
#[derive(Debug, Default)]
pub struct GeneratedKeys {
    /// A generated or loaded API key, if none was configured.
    pub api_key: Option<String>,
    /// A generated or loaded node key, if none was configured.
    pub node_key: Option<String>,
}

/// Fills empty key lists from `<data_dir>/api-key` and `<data_dir>/node-key`, generating and
/// saving (mode 0600) any that is missing.
///
/// # Errors
/// I/O errors on the data directory.
pub fn ensure_keys(cfg: &mut Config) -> std::io::Result<GeneratedKeys> {
    let mut out = GeneratedKeys::default();
    if cfg.api_keys.is_empty() {
        let k = load_or_create_key(&cfg.data_dir.join("api-key"), "apex-")?;
        cfg.api_keys.push(k.clone());
        out.api_key = Some(k);
    }
    if cfg.node_keys.is_empty() {
        let k = load_or_create_key(&cfg.data_dir.join("node-key"), "node-")?;
        cfg.node_keys.push(k.clone());
        out.node_key = Some(k);
    }
    Ok(out)
}

fn load_or_create_key(path: &Path, prefix: &str) -> std::io::Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        let s = s.trim().to_owned();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let key = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(path)?, key.as_bytes())?;
    Ok(key)
}

#[cfg(test)]
mod tests;

//! MCP servers mounted on the node (`mcp_servers` in the config): each one is a child process
//! spoken to over stdio with the Model Context Protocol (rmcp's client), and each of its tools
//! is offered to the hub as the node tool `<server>.<tool>`, with the tool's input schema.
//!
//! - **Start.** [`start`] launches every configured server at once, runs the `initialize`
//!   handshake and `tools/list` (at most [`STARTUP_TIMEOUT`]), and returns one [`Tool`] per
//!   server tool. A server that cannot be started, or does not answer, is logged in one line
//!   (with the last line it wrote to stderr) and left out: the node starts without its tools.
//!   Tools are discovered only here: the node registers them once; a tool the server adds later
//!   is not offered, one it drops fails when called.
//! - **Calls.** A task for `<server>.<tool>` sends one `tools/call` with the task's arguments
//!   (a JSON object; `null` sends none). The result maps to the task's result by
//!   [`result_value`]: text content becomes the result (a text holding a JSON object or array
//!   is parsed, any other text stays a string; several text blocks make an array), a result
//!   with only `structuredContent` gives that value, one with other content (images,
//!   resources) gives the MCP `content` list as is; `isError: true` fails the task with the
//!   text. Dropping the task's future (cancel, timeout) cancels the MCP request.
//! - **Restarts.** A supervisor task per server waits for the process to end (its stdout
//!   closes), then starts it again after an exponential backoff with full jitter from
//!   [`RESTART_INITIAL`] to [`RESTART_MAX`] (back to the start once a run lasted
//!   [`STABLE_AFTER`]). A call that arrives while the server is down **waits** up to
//!   [`RESTART_WAIT`] for it to be back, then fails with `task_execution_failed` naming the
//!   server and why it is down. A call in flight when the process dies is sent once more, to
//!   the restarted server (it may have run on the dead one: execution is at-least-once); if
//!   that one dies under it too, the task fails.
//! - **Environment.** A server inherits the node's environment without its `APEX_NODE_*`
//!   variables (the node key), plus its own `env`; it runs in a process group of its own (a
//!   terminal's Ctrl-C reaches the node, which then stops it) and is killed when the node stops.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientConfig, Implementation, JsonObject,
};
use rmcp::service::{Peer, RunningService, ServiceError};
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::tools::{Error, Tool, ToolContext, ToolFuture};

/// How long a server may take to start and list its tools, at node start and at each restart.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a call waits for a server that is down (being restarted) before it fails.
pub const RESTART_WAIT: Duration = Duration::from_secs(10);
/// First ceiling of the delay before a restart.
pub const RESTART_INITIAL: Duration = Duration::from_millis(250);
/// Largest ceiling of the delay before a restart.
pub const RESTART_MAX: Duration = Duration::from_secs(30);
/// A run this long resets the restart backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Longest server name, in characters.
pub const MAX_SERVER_NAME: usize = 64;
/// Longest node tool name (`<server>.<tool>`), in bytes: the hub's limit on tool names
/// (`apex_protocol` validation, `Limits::max_name_len`).
const MAX_TOOL_NAME: usize = 256;
/// Lines of a server's stderr kept to explain why it failed.
const STDERR_TAIL_LINES: usize = 5;
/// The `PluginInfo.format` of an MCP server's tools.
pub const PLUGIN_FORMAT: &str = "mcp";

/// One entry of `mcp_servers`: an MCP server the node starts and talks to over stdio.
///
/// TOML: `[[mcp_servers]]` tables, or `mcp_servers = [{ name = "files", command = "npx",
/// args = ["-y", "@modelcontextprotocol/server-filesystem", "/srv"] }]`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The server's name, the prefix of its tools (`<name>.<tool>`): 1 to 64 ASCII letters,
    /// digits, `_` or `-`, unique among the node's servers.
    pub name: String,
    /// The program to run (a path, or a name looked up in `PATH`).
    pub command: String,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables set for it, on top of the node's own (without `APEX_NODE_*`).
    /// Values are never logged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `env` often carries tokens for the server: names only.
        f.debug_struct("ServerConfig")
            .field("name", &self.name)
            .field("command", &self.command)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Checks `mcp_servers`: names well-formed and unique, commands not empty, variable names
/// usable. Returns the list trimmed.
///
/// # Errors
/// [`crate::config::Error::Invalid`] on `mcp_servers`, naming the entry.
pub fn validate(servers: Vec<ServerConfig>) -> Result<Vec<ServerConfig>, crate::config::Error> {
    let bad = |reason: String| crate::config::Error::Invalid {
        field: "mcp_servers",
        reason,
    };
    let mut names = BTreeSet::new();
    let mut out = Vec::with_capacity(servers.len());
    for mut s in servers {
        s.name = s.name.trim().to_owned();
        s.command = s.command.trim().to_owned();
        let name_ok = !s.name.is_empty()
            && s.name.chars().count() <= MAX_SERVER_NAME
            && s.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(bad(format!(
                "name `{}` must be 1 to {MAX_SERVER_NAME} ascii letters, digits, `_` or `-`",
                s.name
            )));
        }
        if !names.insert(s.name.clone()) {
            return Err(bad(format!("name `{}` is used twice", s.name)));
        }
        if s.command.is_empty() {
            return Err(bad(format!("server `{}` has an empty command", s.name)));
        }
        if let Some(k) = s
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(bad(format!(
                "server `{}` has an invalid variable name `{k}`",
                s.name
            )));
        }
        if s.env.values().any(|v| v.contains('\0')) || s.args.iter().any(|a| a.contains('\0')) {
            return Err(bad(format!(
                "server `{}` has a NUL byte in args or env",
                s.name
            )));
        }
        out.push(s);
    }
    Ok(out)
}

/// Starts every server in `servers` (concurrently) and returns the tools they offer, as node
/// tools named `<server>.<tool>`. Servers that fail are logged and skipped; their supervisors
/// run until every returned tool is dropped.
pub async fn start(servers: &[ServerConfig]) -> Vec<Arc<dyn Tool>> {
    let started = futures::future::join_all(servers.iter().map(|cfg| async move {
        let name = cfg.name.clone();
        (name, Server::start(cfg.clone()).await)
    }))
    .await;
    let mut tools: Vec<Arc<dyn Tool>> = Vec::new();
    for (name, result) in started {
        match result {
            Ok(listed) => {
                let count = listed.len();
                tools.extend(listed.into_iter().map(|t| Arc::new(t) as Arc<dyn Tool>));
                tracing::info!(server = %name, tools = count, "MCP server started");
            }
            Err(reason) => {
                tracing::warn!(server = %name, error = %reason, "MCP server not started; its tools are not offered");
            }
        }
    }
    tools
}

/// Whether the server can take calls now.
#[derive(Clone)]
enum Status {
    Up(Peer<RoleClient>),
    Down(String),
}

/// A handle on one supervised server (cheap to clone). The supervisor stops, and kills the
/// process, once every handle is gone.
#[derive(Clone)]
struct Server {
    name: Arc<str>,
    status: watch::Receiver<Status>,
}

/// A running server process with its MCP session.
struct Running {
    service: RunningService<RoleClient, ClientConfig>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    /// Launches the server, lists its tools and starts its supervisor, which runs as long as
    /// one of the returned tools is alive (a server with no tools is stopped at once).
    async fn start(cfg: ServerConfig) -> Result<Vec<McpTool>, String> {
        let running = launch(&cfg).await?;
        let listed =
            match tokio::time::timeout(STARTUP_TIMEOUT, running.service.peer().list_all_tools())
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    return Err(explain(&format!("tools/list failed: {e}"), &running.stderr));
                }
                Err(_) => {
                    return Err(explain(
                        &format!("tools/list unanswered after {STARTUP_TIMEOUT:?}"),
                        &running.stderr,
                    ));
                }
            };
        let version = running
            .service
            .peer()
            .peer_info()
            .and_then(|i| i.server_info.as_ref().map(|s| s.version.clone()))
            .filter(|v| !v.is_empty());
        let (tx, status) = watch::channel(Status::Up(running.service.peer().clone()));
        let server = Server {
            name: Arc::from(cfg.name.as_str()),
            status,
        };
        let mut tools = Vec::with_capacity(listed.len());
        for t in listed {
            let full = format!("{}.{}", cfg.name, t.name);
            if t.name.is_empty() || full.len() > MAX_TOOL_NAME {
                tracing::warn!(server = %cfg.name, tool = %t.name, "MCP tool skipped: its name is empty or longer than {MAX_TOOL_NAME} bytes with the server's prefix");
                continue;
            }
            tools.push(McpTool {
                description: t
                    .description
                    .as_deref()
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{} (MCP server {})", t.name, cfg.name)),
                schema: Value::Object((*t.input_schema).clone()),
                remote: t.name.to_string(),
                name: full,
                version: version.clone(),
                server: server.clone(),
            });
        }
        tokio::spawn(supervise(cfg, running, tx));
        Ok(tools)
    }

    /// The session to call, waiting up to [`RESTART_WAIT`] while the server is down.
    async fn peer(&self) -> Result<Peer<RoleClient>, Error> {
        let mut status = self.status.clone();
        let up = tokio::time::timeout(
            RESTART_WAIT,
            status.wait_for(|s| matches!(s, Status::Up(p) if !p.is_transport_closed())),
        )
        .await;
        match up {
            Ok(Ok(s)) => match &*s {
                Status::Up(p) => Ok(p.clone()),
                Status::Down(_) => Err(Error::Failed(format!(
                    "MCP server `{}` is not running",
                    self.name
                ))),
            },
            Ok(Err(_)) => Err(Error::Failed(format!(
                "MCP server `{}` is stopped (the node is shutting down)",
                self.name
            ))),
            Err(_) => {
                let why = match &*self.status.borrow() {
                    Status::Down(why) => why.clone(),
                    Status::Up(_) => "its process exited".to_owned(),
                };
                Err(Error::Failed(format!(
                    "MCP server `{}` is not running ({why}); still down after {}s, it is being restarted",
                    self.name,
                    RESTART_WAIT.as_secs()
                )))
            }
        }
    }

    /// One `tools/call` of the server's tool `tool`; sent once more to the restarted server
    /// when the process dies during the call.
    async fn call(&self, tool: String, args: Option<JsonObject>) -> Result<Value, Error> {
        let mut params = CallToolRequestParams::new(tool);
        if let Some(args) = args {
            params = params.with_arguments(args);
        }
        let mut retried = false;
        loop {
            let peer = self.peer().await?;
            return match peer.call_tool(params.clone()).await {
                Ok(r) => result_value(r).map_err(Error::Failed),
                Err(ServiceError::McpError(e))
                    if e.code == rmcp::model::ErrorCode::INVALID_PARAMS =>
                {
                    Err(Error::InvalidArguments(e.message.into_owned()))
                }
                Err(ServiceError::McpError(e)) => Err(Error::Failed(format!(
                    "MCP server `{}` answered error {}: {}",
                    self.name, e.code.0, e.message
                ))),
                Err(ServiceError::TransportClosed | ServiceError::TransportSend(_)) if !retried => {
                    // The process died under the call (it may or may not have run it; tasks
                    // are at-least-once): once more on the restarted one.
                    retried = true;
                    continue;
                }
                Err(ServiceError::TransportClosed | ServiceError::TransportSend(_)) => {
                    Err(Error::Failed(format!(
                        "MCP server `{}` exited during the call, twice; it is being restarted",
                        self.name
                    )))
                }
                Err(e) => Err(Error::Failed(format!("MCP server `{}`: {e}", self.name))),
            };
        }
    }
}

/// Starts the process and runs the `initialize` handshake (at most [`STARTUP_TIMEOUT`]).
async fn launch(cfg: &ServerConfig) -> Result<Running, String> {
    let mut cmd = tokio::process::Command::new(&cfg.command);
    cmd.args(&cfg.args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with(crate::config::ENV_PREFIX) {
            cmd.env_remove(&k);
        }
    }
    cmd.envs(&cfg.env).kill_on_drop(true).process_group(0);
    let (transport, stderr) = TokioChildProcess::builder(cmd)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", cfg.command))?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let mut reader = None;
    if let Some(stderr) = stderr {
        let (tail, name) = (tail.clone(), cfg.name.clone());
        reader = Some(tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(server = %name, "mcp server: {line}");
                let mut t = tail.lock();
                if t.len() == STDERR_TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }));
    }
    let client = ClientConfig::new(
        Default::default(),
        Implementation::new("apex-node", env!("CARGO_PKG_VERSION")),
    );
    match tokio::time::timeout(STARTUP_TIMEOUT, client.serve(transport)).await {
        Ok(Ok(service)) => Ok(Running {
            service,
            stderr: tail,
        }),
        Ok(Err(e)) => {
            // The process is gone (or being killed): let the reader catch its last words.
            if let Some(reader) = reader {
                let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
            }
            Err(explain(&format!("initialize failed: {e}"), &tail))
        }
        Err(_) => Err(explain(
            &format!("no answer to initialize within {STARTUP_TIMEOUT:?}"),
            &tail,
        )),
    }
}

/// `what`, with the last line the server wrote to stderr.
fn explain(what: &str, stderr: &Mutex<VecDeque<String>>) -> String {
    match stderr.lock().iter().rev().find(|l| !l.trim().is_empty()) {
        Some(last) => format!("{what}; its stderr ended with: {}", last.trim()),
        None => what.to_owned(),
    }
}

/// Watches a server and restarts it whenever its process ends, until every handle is gone.
async fn supervise(cfg: ServerConfig, mut running: Running, tx: watch::Sender<Status>) {
    let mut backoff = Backoff::new(RESTART_INITIAL, RESTART_MAX);
    loop {
        let since = Instant::now();
        let cancel = running.service.cancellation_token();
        let ended = tokio::select! {
            r = running.service.waiting() => r,
            () = tx.closed() => {
                // The node dropped the tools: stop the server (the transport kills it).
                cancel.cancel();
                return;
            }
        };
        let why = explain(
            &format!("its process exited ({})", quit_reason(ended)),
            &running.stderr,
        );
        tracing::warn!(server = %cfg.name, reason = %why, "MCP server stopped; restarting it");
        tx.send_replace(Status::Down(why));
        if since.elapsed() >= STABLE_AFTER {
            backoff.reset();
        }
        running = loop {
            let delay = backoff.next_delay(&mut rand::rng());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = tx.closed() => return,
            }
            match launch(&cfg).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(server = %cfg.name, error = %e, "MCP server restart failed; trying again");
                    tx.send_replace(Status::Down(format!("restart failed: {e}")));
                }
            }
        };
        tracing::info!(server = %cfg.name, "MCP server restarted");
        tx.send_replace(Status::Up(running.service.peer().clone()));
    }
}

fn quit_reason(r: Result<rmcp::service::QuitReason, tokio::task::JoinError>) -> String {
    match r {
        Ok(rmcp::service::QuitReason::Closed) => "stdout closed".to_owned(),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("session task failed: {e}"),
    }
}

/// Maps a `tools/call` result to a task result (see the module doc).
///
/// # Errors
/// The result's text (or a generic message) when it says `isError: true`.
pub fn result_value(r: CallToolResult) -> Result<Value, String> {
    let texts: Vec<&str> = r
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
        .collect();
    if r.is_error == Some(true) {
        let msg = texts.join("\n");
        return Err(if !msg.trim().is_empty() {
            msg
        } else if let Some(s) = &r.structured_content {
            s.to_string()
        } else {
            "the MCP tool reported an error without a message".to_owned()
        });
    }
    if r.content.is_empty() {
        return Ok(r.structured_content.unwrap_or(Value::Null));
    }
    if texts.len() < r.content.len() {
        return Ok(serde_json::to_value(&r.content).unwrap_or(Value::Null));
    }
    Ok(match texts.as_slice() {
        [one] => text_value(one),
        many => Value::Array(many.iter().map(|t| text_value(t)).collect()),
    })
}

/// A text holding a JSON object or array, parsed; any other text as a string.
fn text_value(text: &str) -> Value {
    let t = text.trim_start();
    if (t.starts_with('{') || t.starts_with('['))
        && let Ok(v) = serde_json::from_str::<Value>(text)
    {
        return v;
    }
    Value::String(text.to_owned())
}

/// One tool of an MCP server, offered as the node tool `<server>.<tool>`.
struct McpTool {
    name: String,
    remote: String,
    description: String,
    schema: Value,
    version: Option<String>,
    server: Server,
}

impl Tool for McpTool {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn parameters(&self) -> Value {
        self.schema.clone()
    }

    /// Declared as a plugin of format `mcp` (with the server's version), so the catalogue
    /// lists it and `POST /api/v1/plugins/{name}/disable` can switch it off.
    fn plugin(&self) -> Option<apex_protocol::PluginInfo> {
        Some(apex_protocol::PluginInfo {
            version: self.version.clone(),
            format: Some(PLUGIN_FORMAT.to_owned()),
            ..apex_protocol::PluginInfo::default()
        })
    }

    fn call(&self, args: Value, _ctx: ToolContext) -> ToolFuture {
        let args = match args {
            Value::Null => None,
            Value::Object(o) => Some(o),
            _ => {
                return Box::pin(async {
                    Err(Error::InvalidArguments(
                        "arguments must be a JSON object".to_owned(),
                    ))
                });
            }
        };
        let (server, remote) = (self.server.clone(), self.remote.clone());
        Box::pin(async move { server.call(remote, args).await })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rmcp::model::ContentBlock;
    use serde_json::json;

    fn server(name: &str) -> ServerConfig {
        ServerConfig {
            name: name.into(),
            command: "python3".into(),
            args: vec![],
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn config_is_validated() {
        let ok = validate(vec![server(" files "), server("git_2-x")]).unwrap();
        assert_eq!(ok[0].name, "files");
        for (bad, what) in [
            (vec![server("")], "name"),
            (vec![server("a.b")], "name"),
            (vec![server("a"), server("a")], "twice"),
            (
                vec![ServerConfig {
                    command: " ".into(),
                    ..server("a")
                }],
                "empty command",
            ),
            (
                vec![ServerConfig {
                    env: BTreeMap::from([("A=B".into(), "x".into())]),
                    ..server("a")
                }],
                "variable",
            ),
        ] {
            let e = validate(bad).unwrap_err().to_string();
            assert!(e.starts_with("mcp_servers: "), "{e}");
            assert!(e.contains(what), "{e}");
        }
    }

    #[test]
    fn servers_are_read_from_toml_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "hub = \"ws://h:1\"\nkey = \"k\"\n[[mcp_servers]]\nname = \"files\"\n\
             command = \"python3\"\nargs = [\"server.py\"]\nenv = { TOKEN = \"t\" }\n",
        )
        .unwrap();
        let c = crate::config::layered(Some(&file), vec![], Default::default())
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.mcp_servers.len(), 1);
        assert_eq!(c.mcp_servers[0].args, vec!["server.py"]);
        assert_eq!(c.mcp_servers[0].env["TOKEN"], "t");
        let raw = crate::config::layered(
            None,
            vec![(
                "APEX_NODE_MCP_SERVERS".to_owned(),
                "[{name=git, command=uvx, args=[mcp-server-git]}]".to_owned(),
            )],
            Default::default(),
        )
        .unwrap();
        assert_eq!(raw.mcp_servers[0].command, "uvx");
        let e = crate::config::layered(
            Some(&file),
            vec![(
                "APEX_NODE_MCP_SERVERS".to_owned(),
                "[{name=git, cmd=uvx}]".to_owned(),
            )],
            Default::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cmd"), "{e}");
    }

    #[tokio::test]
    async fn a_server_that_does_not_start_is_left_out() {
        let missing = ServerConfig {
            command: "/nonexistent/mcp-server".into(),
            ..server("missing")
        };
        let dies = ServerConfig {
            command: "sh".into(),
            args: vec!["-c".into(), "echo no such module >&2; exit 3".into()],
            ..server("dies")
        };
        let started = Instant::now();
        let tools = start(&[missing, dies]).await;
        assert!(tools.is_empty());
        assert!(started.elapsed() < Duration::from_secs(10));
        let e = match launch(&server_cmd(
            "sh",
            &["-c", "echo bad interpreter >&2; exit 3"],
        ))
        .await
        {
            Ok(_) => panic!("started"),
            Err(e) => e,
        };
        assert!(e.contains("initialize failed"), "{e}");
        assert!(e.contains("bad interpreter"), "{e}");
    }

    fn server_cmd(command: &str, args: &[&str]) -> ServerConfig {
        ServerConfig {
            command: command.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..server("s")
        }
    }

    #[test]
    fn env_values_are_not_printed() {
        let s = ServerConfig {
            env: BTreeMap::from([("TOKEN".into(), "s3cret".into())]),
            ..server("a")
        };
        let shown = format!("{s:?}");
        assert!(
            shown.contains("TOKEN") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    fn result(content: Vec<ContentBlock>, error: bool) -> CallToolResult {
        let mut r = if error {
            CallToolResult::error(content)
        } else {
            CallToolResult::success(content)
        };
        r.structured_content = None;
        r
    }

    #[test]
    fn results_map_to_task_results() {
        let text = |s: &str| ContentBlock::text(s);
        assert_eq!(
            result_value(result(vec![text("hello")], false)),
            Ok(json!("hello"))
        );
        assert_eq!(
            result_value(result(vec![text(r#"{"a": 1}"#)], false)),
            Ok(json!({"a": 1}))
        );
        // Only objects and arrays are parsed: a number-looking text stays text.
        assert_eq!(
            result_value(result(vec![text("42")], false)),
            Ok(json!("42"))
        );
        assert_eq!(
            result_value(result(vec![text("{not json")], false)),
            Ok(json!("{not json"))
        );
        assert_eq!(
            result_value(result(vec![text("a"), text("[1]")], false)),
            Ok(json!(["a", [1]]))
        );
        assert_eq!(
            result_value(result(vec![text("boom"), text("again")], true)),
            Err("boom\nagain".to_owned())
        );
        assert!(result_value(result(vec![], true)).is_err());
        let mut structured = result(vec![], false);
        structured.structured_content = Some(json!({"n": 2}));
        assert_eq!(result_value(structured), Ok(json!({"n": 2})));
        let image = ContentBlock::image("aGk=", "image/png");
        let v = result_value(result(vec![text("see"), image], false)).unwrap();
        assert_eq!(v[1]["type"], "image", "{v}");
        assert_eq!(v[0]["text"], "see", "{v}");
    }
}

//! Child processes: the hub and nodes as real binaries, their output drained to log files so a
//! pipe never blocks, signals (SIGKILL, SIGSTOP/SIGCONT, SIGTERM), and kill on drop.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::api::{Api, NodeInfo};
use crate::wait::{DEFAULT_TIMEOUT, wait_until};

/// How long a hub may take to print its `listening on` line.
const HUB_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of a log shown in error messages and on test failure.
const LOG_TAIL_LINES: usize = 40;

/// The directory holding `apex-hub` and `apex-node`: `$APEX_BIN_DIR` if set, else the
/// `target/<profile>` directory of the running executable (test and example executables live
/// in its `deps/` and `examples/` subdirectories).
///
/// # Errors
/// If the current executable's path cannot be determined.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("APEX_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot locate the current executable")?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow!("executable {} has no parent", exe.display()))?
        .to_path_buf();
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir.pop();
    }
    Ok(dir)
}

/// Full path of a binary in [`bin_dir`], checked to exist.
///
/// # Errors
/// If the binary has not been built.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --workspace` (or set APEX_BIN_DIR)",
            path.display()
        );
    }
    Ok(path)
}

/// A running child process whose stdout and stderr are copied to a log file.
///
/// Killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: String,
    log_path: PathBuf,
    status: Option<ExitStatus>,
    /// The threads copying stdout and stderr to the log; finished once the process closed both.
    drains: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Spawns `cmd`, copying both output streams to `log_path`. Every stdout line is also sent
    /// to `lines` when given (the hub's readiness line is read that way).
    ///
    /// # Errors
    /// If the log file cannot be created or the program cannot be started.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log_path: &Path,
        lines: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<Self> {
        let log =
            Arc::new(Mutex::new(File::create(log_path).with_context(|| {
                format!("creating log file {}", log_path.display())
            })?));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let mut drains = Vec::new();
        if let Some(out) = child.stdout.take() {
            drains.push(drain(out, log.clone(), lines));
        }
        if let Some(err) = child.stderr.take() {
            drains.push(drain(err, log, None));
        }
        Ok(Self {
            child,
            name: name.to_owned(),
            log_path: log_path.to_path_buf(),
            status: None,
            drains,
        })
    }

    /// Waits (at most `limit`) until everything the process wrote to stdout and stderr is in
    /// its log: after it exited, so the log tail holds its last words.
    pub async fn wait_output(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.drains.iter().any(|d| !d.is_finished()) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the process.
    ///
    /// # Errors
    /// If the process is gone or the signal cannot be delivered.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid()), sig)
            .with_context(|| format!("sending {sig} to {} (pid {})", self.name, self.pid()))
    }

    /// The exit status if the process has ended (reaps it).
    ///
    /// # Errors
    /// If waiting on the child fails.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit.
    ///
    /// # Errors
    /// If it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The log file of the process.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log_text(), LOG_TAIL_LINES)
    }

    /// Kills (SIGKILL) and reaps the process if it still runs.
    pub fn kill_now(&mut self) {
        if self.status.is_none() {
            // SIGCONT first: a stopped process cannot be reaped promptly otherwise on some
            // kernels, and a SIGKILL to a stopped process is fine either way.
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGCONT);
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Prints the log tail to stderr if the current thread is panicking (a failing test).
    fn report_if_panicking(&self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}), last {LOG_TAIL_LINES} lines ----\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// End of a hub's or node's life in a test: kills the process and, if the test is failing,
/// prints its log tail and keeps its temporary directory for a look afterwards.
fn retire(proc: &mut Proc, dir: &mut Option<tempfile::TempDir>, what: &str) {
    proc.report_if_panicking();
    proc.kill_now();
    if std::thread::panicking()
        && let Some(dir) = dir.take()
    {
        let kept = dir.keep();
        eprintln!("{what} data and log kept in {}", kept.display());
    }
}

/// Copies `src` line by line into `log` on a thread of its own, forwarding lines to `lines`.
fn drain<R: Read + Send + 'static>(
    src: R,
    log: Arc<Mutex<File>>,
    lines: Option<mpsc::UnboundedSender<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Ok(mut f) = log.lock() {
                        let _ = f.write_all(&buf);
                    }
                    if let Some(tx) = &lines {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                        let _ = tx.send(line);
                    }
                }
            }
        }
    })
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A random key for tests.
fn random_key(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// How to start a hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// HTTP API key (`--api-key`).
    pub api_key: String,
    /// Node channel key (`--node-key`).
    pub node_key: String,
    /// `--heartbeat-interval-ms`, when set.
    pub heartbeat_interval_ms: Option<u64>,
    /// `--heartbeat-timeout-ms`, when set.
    pub heartbeat_timeout_ms: Option<u64>,
    /// `--listen` address (default `127.0.0.1:0`, a free port).
    pub listen: String,
    /// More arguments, appended last.
    pub extra_args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// `--data-dir` (default: a fresh directory of the hub's own).
    pub data_dir: Option<PathBuf>,
    /// `--shutdown-delay-ms`: 0 by default here, so a SIGTERM starts the drain at once (the
    /// hub's own default, 5000, is for load balancers; `tests/tests/lifecycle.rs` tests it).
    pub shutdown_delay_ms: u64,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            api_key: random_key("test-api"),
            node_key: random_key("test-node"),
            heartbeat_interval_ms: None,
            heartbeat_timeout_ms: None,
            listen: "127.0.0.1:0".to_owned(),
            extra_args: Vec::new(),
            env: Vec::new(),
            data_dir: None,
            shutdown_delay_ms: 0,
        }
    }
}

impl HubOptions {
    /// Short liveness settings (ping every 200 ms, dead after 600 ms of silence) for tests of
    /// failure detection.
    pub fn fast_liveness() -> Self {
        Self {
            heartbeat_interval_ms: Some(200),
            heartbeat_timeout_ms: Some(600),
            ..Self::default()
        }
    }
}

/// A running `apex-hub` with its own data directory. Killed on drop.
#[derive(Debug)]
pub struct Hub {
    proc: Proc,
    addr: SocketAddr,
    opts: HubOptions,
    dir: Option<TempDir>,
    api: Api,
    restarts: u32,
}

impl Hub {
    /// Starts `apex-hub` on `opts.listen` with a fresh data directory and waits for its
    /// `listening on http://ADDR` line.
    ///
    /// # Errors
    /// If the binary is missing, exits, or does not print the line within 30 s; the error holds
    /// the tail of its output.
    pub async fn start(opts: HubOptions) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("apex-hub-").tempdir()?;
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        std::fs::create_dir_all(&data_dir)?;
        let (proc, addr) =
            Self::launch(&opts, &opts.listen, &data_dir, &dir.path().join("hub.log")).await?;
        let api = Api::new(&format!("http://{addr}"), &opts.api_key)?;
        Ok(Self {
            proc,
            addr,
            opts,
            dir: Some(dir),
            api,
            restarts: 0,
        })
    }

    /// SIGKILLs the hub and starts it again on the same address and data directory (its log
    /// goes to `hub-N.log`). Waits for the `listening on` line.
    ///
    /// # Errors
    /// As [`Hub::start`].
    pub async fn kill_and_restart(&mut self) -> Result<()> {
        self.proc.kill_now();
        self.start_again().await
    }

    /// Starts the hub again after it exited (see [`Hub::kill_and_restart`]).
    ///
    /// # Errors
    /// As [`Hub::start`].
    pub async fn start_again(&mut self) -> Result<()> {
        self.proc.kill_now();
        let dir = self
            .dir
            .as_ref()
            .context("the hub's directory is gone")?
            .path()
            .to_owned();
        self.restarts += 1;
        let log = dir.join(format!("hub-{}.log", self.restarts + 1));
        let listen = self.addr.to_string();
        let data_dir = self
            .opts
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.join("data"));
        let (proc, addr) = Self::launch(&self.opts, &listen, &data_dir, &log).await?;
        // The old process's log stays next to the new one.
        self.proc = proc;
        self.addr = addr;
        Ok(())
    }

    async fn launch(
        opts: &HubOptions,
        listen: &str,
        data_dir: &Path,
        log: &Path,
    ) -> Result<(Proc, SocketAddr)> {
        let bin = bin_path("apex-hub")?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--api-key")
            .arg(&opts.api_key)
            .arg("--node-key")
            .arg(&opts.node_key)
            .arg("--shutdown-delay-ms")
            .arg(opts.shutdown_delay_ms.to_string());
        if let Some(ms) = opts.heartbeat_interval_ms {
            cmd.arg("--heartbeat-interval-ms").arg(ms.to_string());
        }
        if let Some(ms) = opts.heartbeat_timeout_ms {
            cmd.arg("--heartbeat-timeout-ms").arg(ms.to_string());
        }
        cmd.args(&opts.extra_args);
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut proc = Proc::spawn("apex-hub", cmd, log, Some(tx))?;

        let deadline = tokio::time::Instant::now() + HUB_START_TIMEOUT;
        let addr = loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => {
                    if let Some(rest) = line.trim().strip_prefix("listening on http://") {
                        break rest.parse::<SocketAddr>().with_context(|| {
                            format!("hub printed an unparsable address: {line:?}")
                        })?;
                    }
                }
                Ok(None) => {
                    // stdout closed: the hub exited (or closed stdout) without the line.
                    let status = proc.wait_exit(Duration::from_secs(5)).await.ok();
                    // Its last words (the reason it stopped) may still be in the stderr pipe.
                    proc.wait_output(Duration::from_secs(5)).await;
                    bail!(
                        "apex-hub exited ({status:?}) before printing `listening on`; output:\n{}",
                        proc.log_tail()
                    );
                }
                Err(_) => bail!(
                    "apex-hub did not print `listening on http://ADDR` within {HUB_START_TIMEOUT:?}; output:\n{}",
                    proc.log_tail()
                ),
            }
        };
        Ok((proc, addr))
    }

    /// Starts a hub with default options.
    ///
    /// # Errors
    /// See [`Hub::start`].
    pub async fn start_default() -> Result<Self> {
        Self::start(HubOptions::default()).await
    }

    /// Starts a hub with `toml` as its config file (`--config`), then `extra` arguments, over
    /// `base` options (default ones when `None`).
    ///
    /// # Errors
    /// As [`Hub::start`], or if the file cannot be written.
    pub async fn start_with_config(
        toml: &str,
        extra: &[&str],
        base: Option<HubOptions>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?.keep();
        let path = dir.join("hub.toml");
        std::fs::write(&path, toml)?;
        let base = base.unwrap_or_default();
        let mut args = base.extra_args.clone();
        args.extend(["--config".to_owned(), path.display().to_string()]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self::start(HubOptions {
            extra_args: args,
            ..base
        })
        .await
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://ADDR` (what `apex-node --hub` takes).
    pub fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// A node channel URL with the key in the path: `ws://ADDR/<prefix>/VCP_Key=<node key>`.
    pub fn node_url(&self, prefix: &str) -> String {
        format!("ws://{}/{prefix}/VCP_Key={}", self.addr, self.opts.node_key)
    }

    /// The HTTP API key.
    pub fn api_key(&self) -> &str {
        &self.opts.api_key
    }

    /// The node channel key.
    pub fn node_key(&self) -> &str {
        &self.opts.node_key
    }

    /// The options the hub was started with.
    pub fn options(&self) -> &HubOptions {
        &self.opts
    }

    /// An API client authenticated with the hub's API key.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// The hub's data and log directory.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }

    /// The hub's combined stdout/stderr so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// The hub's log file.
    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }

    /// Sends a signal to the hub.
    ///
    /// # Errors
    /// If the signal cannot be delivered.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        self.proc.signal(sig)
    }

    /// Whether the hub has exited.
    ///
    /// # Errors
    /// If waiting on the child fails.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        self.proc.try_status()
    }

    /// Waits until `GET /v1/nodes` lists a node named `name` as `online`, and returns it.
    ///
    /// # Errors
    /// If that does not happen within [`DEFAULT_TIMEOUT`].
    pub async fn wait_node_online(&self, name: &str) -> Result<NodeInfo> {
        let api = self.api.clone();
        wait_until(
            &format!("node {name:?} to be listed online"),
            DEFAULT_TIMEOUT,
            || {
                let api = api.clone();
                async move {
                    Ok(api
                        .nodes()
                        .await?
                        .into_iter()
                        .find(|n| n.name == name && n.status == "online"))
                }
            },
        )
        .await
    }

    /// Waits until `GET /v1/nodes/{id}` reports `status`, or the node is no longer listed
    /// when `status` is `offline`.
    ///
    /// # Errors
    /// If that does not happen within `timeout`.
    pub async fn wait_node_status(&self, id: &str, status: &str, timeout: Duration) -> Result<()> {
        let api = self.api.clone();
        wait_until(&format!("node {id} to become {status}"), timeout, || {
            let api = api.clone();
            async move {
                Ok(match api.node(id).await? {
                    Some(n) => (n.status == status).then_some(()),
                    None => (status == "offline").then_some(()),
                })
            }
        })
        .await
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        retire(&mut self.proc, &mut self.dir, "hub");
    }
}

/// How to start a node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// `--name`; must be unique per hub so [`Hub::wait_node_online`] finds it.
    pub name: String,
    /// `--max-concurrent-tasks`, when set.
    pub max_concurrent_tasks: Option<u32>,
    /// More arguments, appended last (e.g. `--msgpack`, `--file-root DIR`).
    pub extra_args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl NodeOptions {
    /// Options with just a name.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// Sets `--max-concurrent-tasks`.
    pub fn concurrency(mut self, n: u32) -> Self {
        self.max_concurrent_tasks = Some(n);
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A running `apex-node` with its own data directory. Killed on drop.
#[derive(Debug)]
pub struct Node {
    proc: Proc,
    name: String,
    id: String,
    dir: Option<TempDir>,
}

impl Node {
    /// Starts `apex-node` against `hub` and does not wait for it to register ([`Node::id`] is
    /// empty until [`Node::wait_online`]).
    ///
    /// # Errors
    /// If the binary is missing or cannot be started.
    pub fn spawn(hub: &Hub, opts: &NodeOptions) -> Result<Self> {
        Self::spawn_at(&hub.ws_base(), hub.node_key(), opts)
    }

    /// Starts `apex-node` against a hub at `hub_ws` (`ws://HOST:PORT`) with `key`.
    ///
    /// # Errors
    /// If the binary is missing or cannot be started.
    pub fn spawn_at(hub_ws: &str, key: &str, opts: &NodeOptions) -> Result<Self> {
        let bin = bin_path("apex-node")?;
        let dir = tempfile::Builder::new().prefix("apex-node-").tempdir()?;
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--hub")
            .arg(hub_ws)
            .arg("--key")
            .arg(key)
            .arg("--name")
            .arg(&opts.name)
            .arg("--data-dir")
            .arg(&data_dir);
        if let Some(n) = opts.max_concurrent_tasks {
            cmd.arg("--max-concurrent-tasks").arg(n.to_string());
        }
        cmd.args(&opts.extra_args);
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        let label = format!("apex-node {}", opts.name);
        let proc = Proc::spawn(&label, cmd, &dir.path().join("node.log"), None)?;
        Ok(Self {
            proc,
            name: opts.name.clone(),
            id: String::new(),
            dir: Some(dir),
        })
    }

    /// Starts `apex-node` against `hub` and waits until the hub lists it online.
    ///
    /// # Errors
    /// If it does not come online within [`DEFAULT_TIMEOUT`]; the error holds its log tail.
    pub async fn start(hub: &Hub, opts: NodeOptions) -> Result<Self> {
        let mut node = Self::spawn(hub, &opts)?;
        node.wait_online(hub).await?;
        Ok(node)
    }

    /// Waits until the hub lists this node online and records its id.
    ///
    /// # Errors
    /// On timeout, or if the node process exited; the error holds its log tail.
    pub async fn wait_online(&mut self, hub: &Hub) -> Result<NodeInfo> {
        match hub.wait_node_online(&self.name).await {
            Ok(info) => {
                self.id = info.id.clone();
                Ok(info)
            }
            Err(e) => {
                let status = self.proc.try_status().ok().flatten();
                Err(e.context(format!(
                    "apex-node {} (exit status {status:?}); its output:\n{}",
                    self.name,
                    self.proc.log_tail()
                )))
            }
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node id the hub lists it under (empty until it came online).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// SIGKILL: the node dies at once without a word to the hub.
    ///
    /// # Errors
    /// If the signal cannot be delivered.
    pub fn kill(&mut self) -> Result<()> {
        self.proc.signal(Signal::SIGKILL)
    }

    /// SIGSTOP: the node freezes; its socket stays open but silent.
    ///
    /// # Errors
    /// If the signal cannot be delivered.
    pub fn freeze(&self) -> Result<()> {
        self.proc.signal(Signal::SIGSTOP)
    }

    /// SIGCONT: a frozen node resumes.
    ///
    /// # Errors
    /// If the signal cannot be delivered.
    pub fn thaw(&self) -> Result<()> {
        self.proc.signal(Signal::SIGCONT)
    }

    /// SIGTERM: the node drains and leaves.
    ///
    /// # Errors
    /// If the signal cannot be delivered.
    pub fn terminate(&self) -> Result<()> {
        self.proc.signal(Signal::SIGTERM)
    }

    /// Waits up to `timeout` for the process to exit.
    ///
    /// # Errors
    /// If it still runs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.proc.wait_exit(timeout).await
    }

    /// The node's combined stdout/stderr so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        retire(&mut self.proc, &mut self.dir, "node");
    }
}

/// Removes ANSI colour codes (log lines of the binaries).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How many times each task id appears in a `task started` line (apex-node's executor, at
/// debug level) of the given node logs: a task run twice counts 2.
pub fn task_starts<'a>(
    logs: impl IntoIterator<Item = &'a str>,
) -> std::collections::HashMap<String, usize> {
    let mut started = std::collections::HashMap::new();
    for log in logs {
        for line in strip_ansi(log).lines() {
            if line.contains("task started")
                && let Some(rest) = line.split("task_id=").nth(1)
            {
                let id = rest.split_whitespace().next().unwrap_or_default();
                *started.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    started
}

/// Processes that still exist with `KEY=VALUE` (e.g. `APEX_PLUGIN_NAME=word_count`, which
/// `apex-node` sets for a plugin's process and its children inherit) in their environment,
/// and zombies whose parent is `parent`: what a plugin run left behind. Reads `/proc`
/// (Linux); processes that vanish while being read are skipped.
///
/// Returns `(alive, zombies)`, process ids in no particular order.
pub fn leftover_processes(env_marker: &str, parent: i32) -> (Vec<i32>, Vec<i32>) {
    let mut alive = Vec::new();
    let mut zombies = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (alive, zombies);
    };
    for entry in dir.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid: i32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if state == "Z" {
            if ppid == parent {
                zombies.push(pid);
            }
            continue;
        }
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == env_marker.as_bytes()) {
            alive.push(pid);
        }
    }
    (alive, zombies)
}

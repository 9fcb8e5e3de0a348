//! The `apex-node` binary: parses flags, loads the configuration, sets up logging to stderr and
//! runs [`apex_node::run`] until SIGTERM/SIGINT (a second SIGINT exits at once).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use apex_node::config::{self, RawConfig};
use clap::Parser;

/// Exit code for an invalid command line or configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// apex-node: a worker node that runs tools for an apex hub.
///
/// Settings are layered: defaults, then the TOML file given with --config, then APEX_NODE_*
/// environment variables (e.g. APEX_NODE_KEY, APEX_NODE_MAX_CONCURRENT_TASKS,
/// APEX_NODE_HUB="[ws://a:8080, ws://b:8080]"), then these flags. An invalid configuration
/// exits with code 64.
#[derive(Debug, Parser)]
#[command(name = "apex-node", version, about, long_about)]
struct Cli {
    /// Hub WebSocket URL (ws:// or wss://). Repeat to list fallback hubs, tried in turn. A URL
    /// without a path connects to /distributed-server. `auto` (alone) finds the hub on the
    /// local network over mDNS (_apex._tcp; a hub started with --discovery) before every
    /// connection attempt; while none answers, the node says so and keeps looking with the
    /// reconnect backoff, so it may start before its hub.
    #[arg(long = "hub", value_name = "URL|auto")]
    hub: Vec<String>,

    /// Node key, sent as "Authorization: Bearer KEY" (prefer APEX_NODE_KEY: flags show up in
    /// process lists).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,

    /// Display name of the node [default: the host name].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// How many tasks run at once [default: CPUs × 4, at least 4].
    #[arg(long, value_name = "N")]
    max_concurrent_tasks: Option<u32>,

    /// TOML configuration file (keys as in the flags, with underscores: max_concurrent_tasks,
    /// file_roots, allow_programs, plugin_dirs, drain_timeout_ms, ...).
    #[arg(long, value_name = "FILE", env = "APEX_NODE_CONFIG")]
    config: Option<PathBuf>,

    /// Directory for the node's state (its persistent id) [default: $XDG_DATA_HOME/apex-node,
    /// else ~/.local/share/apex-node, else ./.apex-node].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Directory the file tools (file_read, file_list, sha256 of a path) may access. Repeatable.
    /// Without any, file_read and file_list are not offered.
    #[arg(long = "file-root", value_name = "DIR")]
    file_root: Vec<PathBuf>,

    /// Program the shell tool may run (exact name or path; run directly, no shell). Repeatable.
    /// Without any, the shell tool is not offered.
    #[arg(long = "allow-program", value_name = "PROG")]
    allow_program: Vec<String>,

    /// Ask the hub for MessagePack binary frames instead of JSON after registration.
    #[arg(long)]
    msgpack: bool,

    /// Log filter for stderr, e.g. info, debug or apex_node=debug,warn [default: info].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,

    /// On SIGTERM/SIGINT, how long running tasks may finish before they are aborted, in ms
    /// [default: 30000].
    #[arg(long, value_name = "MS")]
    drain_timeout_ms: Option<u64>,

    /// Largest response body http_fetch returns, in bytes [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    http_fetch_max_body_bytes: Option<u64>,

    /// A destination http_fetch may reach although refused by default (loopback, link-local,
    /// cloud metadata): a CIDR, an address, a host or *.domain. Repeatable.
    #[arg(long = "http-fetch-allow", value_name = "NET|HOST")]
    http_fetch_allow: Vec<String>,

    /// A destination http_fetch may never reach (wins over allow): a CIDR, an address, a host
    /// or *.domain. Repeatable.
    #[arg(long = "http-fetch-deny", value_name = "NET|HOST")]
    http_fetch_deny: Vec<String>,

    /// Time budget of a task assigned without a timeout, in ms [default: 300000].
    #[arg(long, value_name = "MS")]
    default_task_timeout_ms: Option<u64>,

    /// A local OpenAI-compatible server (e.g. http://127.0.0.1:11434/v1) whose models this
    /// node hosts for the hub (tool llm.chat).
    #[arg(long, value_name = "URL")]
    llm_upstream: Option<String>,

    /// Model tools ask the hub for (llm.summarize) when they name none [default: the hub's].
    #[arg(long, value_name = "MODEL")]
    llm_model: Option<String>,

    /// A directory of plugins: each subdirectory with a plugin.json (nex format) or a
    /// plugin-manifest.json (VCP format) becomes a tool, run over stdio in any language; a
    /// bad manifest is skipped with a warning naming the file and field. Repeatable.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dir: Vec<PathBuf>,

    /// With --hub auto: how long one mDNS browse waits for a hub, in ms [default: 5000].
    #[arg(long, value_name = "MS")]
    discovery_timeout_ms: Option<u64>,

    /// Validate the configuration (file, environment, flags), print `configuration ok` and
    /// exit 0, or print one line and exit 64; connects to nothing.
    #[arg(long)]
    check_config: bool,
}

impl Cli {
    /// The flags as the last configuration layer (unset flags leave lower layers alone).
    fn into_layer(self) -> (Option<PathBuf>, RawConfig) {
        // `check_config` is not a setting; `main` reads it first.
        let layer = RawConfig {
            hub: self.hub,
            key: self.key,
            name: self.name,
            max_concurrent_tasks: self.max_concurrent_tasks,
            data_dir: self.data_dir,
            file_roots: self.file_root,
            allow_programs: self.allow_program,
            msgpack: self.msgpack.then_some(true),
            log_level: self.log_level,
            drain_timeout_ms: self.drain_timeout_ms,
            http_fetch_max_body_bytes: self.http_fetch_max_body_bytes,
            http_fetch_allow: self.http_fetch_allow,
            http_fetch_deny: self.http_fetch_deny,
            default_task_timeout_ms: self.default_task_timeout_ms,
            llm_upstream: self.llm_upstream,
            llm_model: self.llm_model,
            plugin_dirs: self.plugin_dir,
            mcp_servers: Vec::new(), // config file or environment only
            discovery_timeout_ms: self.discovery_timeout_ms,
        };
        (self.config, layer)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("apex-node: {}", first.trim_start_matches("error: "));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let check_only = cli.check_config;
    let (file, flags) = cli.into_layer();
    let config = match config::load(file.as_deref(), flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("apex-node: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check_only {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    let telemetry = match apex_node::telemetry::init_from_env() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("apex-node: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(&config.log_level, telemetry.as_ref());
    let served = serve(config);
    if let Some(t) = telemetry {
        t.shutdown();
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "apex-node failed");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str, telemetry: Option<&apex_node::telemetry::Telemetry>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The filter was validated with the configuration.
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config::DEFAULT_LOG_LEVEL));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry()
        .with(filter)
        .with(telemetry.map(|t| t.layer()))
        .with(fmt)
        .init();
}

fn serve(config: apex_node::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let signal = shutdown_signal().context("cannot listen for signals")?;
        let shutdown = async move {
            signal.await;
            apex_node::systemd::stopping();
        };
        let watchdog = apex_node::systemd::spawn_watchdog();
        apex_node::run(config, shutdown).await?;
        if let Some(w) = watchdog {
            w.abort();
        }
        Ok(())
    })
}

/// Completes on the first SIGTERM or SIGINT; a second SIGINT exits the process at once.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received (press Ctrl-C again to exit at once)"),
        }
        let _ = tx.send(());
        int.recv().await;
        tracing::warn!("second SIGINT received; exiting at once");
        std::process::exit(130);
    });
    Ok(async move {
        let _ = rx.await;
    })
}

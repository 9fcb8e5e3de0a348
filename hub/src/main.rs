//! `apex-hub`: parses flags, loads config, starts logging, binds, and runs the hub.

use std::process::ExitCode;

use apex_hub::RunOptions;
use apex_hub::config::{Cli, Config, ensure_keys};
use apex_hub::ops::live::ApplyHook;
use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

/// Exit code for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the task store cannot be opened: locked, unreadable or unreachable.
const EXIT_STORE: u8 = 74;

/// mimalloc instead of glibc malloc: the gateway's hot path allocates on one worker thread and
/// frees on another, which makes glibc's per-thread arenas contend on their locks. Built with
/// `no_thp`: with transparent huge pages its eagerly committed arenas cost ~40 MiB more RSS
/// (1,000 open streams: 99 MiB against 58 MiB, `scripts/bench.sh llm`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
            eprintln!(
                "apex-hub: invalid configuration: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("apex-hub: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        return check_config(&config);
    }
    if cli.healthcheck {
        return healthcheck(config.listen);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.effective_worker_threads())
        .enable_all()
        .build();
    match runtime {
        Ok(rt) => rt.block_on(serve(cli, config)),
        Err(e) => {
            eprintln!("apex-hub: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}

/// The tracing filter of `log_level`: as written, plus `rmcp=warn` unless it names `rmcp`
/// (the MCP library logs three info lines per `/mcp` request).
fn log_filter(level: &str) -> String {
    if level.contains("rmcp") {
        level.to_owned()
    } else {
        format!("{level},rmcp=warn")
    }
}

/// Everything after the config is loaded: logging, keys, store, listeners, then the hub until
/// it stops. Returns the process exit code.
async fn serve(cli: Cli, mut config: Config) -> ExitCode {
    let filter = match EnvFilter::try_new(log_filter(&config.log_level)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("apex-hub: invalid configuration: `log_level` {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The filter sits behind a reload handle so `PUT /v1/config {"log_level"}` applies live.
    let (filter, filter_handle) = reload::Layer::new(filter);
    // OpenTelemetry export when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let telemetry = match apex_hub::telemetry::init_from_env("apex-hub") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("apex-hub: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let otel = telemetry.as_ref().map(|t| t.layer());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if config.log_format == "json" {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    let log_hook: ApplyHook = Box::new(move |c: &Config| {
        let f = EnvFilter::try_new(log_filter(&c.log_level))
            .map_err(|e| ("log_level".to_owned(), e.to_string()))?;
        filter_handle
            .reload(f)
            .map_err(|e| ("log_level".to_owned(), e.to_string()))
    });
    let generated = match ensure_keys(&mut config) {
        Ok(g) => g,
        Err(e) => {
            eprintln!(
                "apex-hub: cannot use data directory {}: {e}",
                config.data_dir.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The access-token secret's variable is read again by `run`; checked here so a missing
    // one is a config error before the hub listens.
    if let Err(e) = config.auth.env_secret() {
        eprintln!("apex-hub: invalid configuration: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let opened = match apex_hub::open_store(&config).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("apex-hub: {e}");
            return ExitCode::from(EXIT_STORE);
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("apex-hub: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(1);
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("apex-hub: {e}");
            return ExitCode::from(1);
        }
    };
    let metrics_listener = match config.metrics_listen {
        None => None,
        Some(m) => match tokio::net::TcpListener::bind(m).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("apex-hub: cannot listen on {m} (metrics_listen): {e}");
                return ExitCode::from(1);
            }
        },
    };
    if let Some(k) = &generated.api_key {
        println!("api key: {k}");
    }
    if let Some(k) = &generated.node_key {
        println!("node key: {k}");
    }
    println!("listening on http://{addr}");
    if let Some(m) = metrics_listener.as_ref().and_then(|l| l.local_addr().ok()) {
        println!("metrics on http://{m}/metrics");
    }
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "apex-hub started");
    let status = format!("serving on http://{addr}");
    let options = RunOptions {
        cli: Some(cli),
        on_config_change: vec![log_hook],
        metrics_listener,
        store: Some(opened),
        on_ready: Some(Box::new(move || apex_hub::systemd::ready(&status))),
    };
    let watchdog = apex_hub::systemd::spawn_watchdog();
    let shutdown = async {
        shutdown_signal().await;
        apex_hub::systemd::stopping();
    };
    let served = apex_hub::run_with(config, listener, shutdown, options).await;
    if let Some(w) = watchdog {
        w.abort();
    }
    if let Some(t) = telemetry {
        // Export buffered spans before exiting; the exporter blocks, so off the runtime.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apex-hub: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--check-config`: what `Config::load` accepted must also build (the LLM gateway's
/// providers); prints `configuration ok` and exits 0, else one line and 64. Opens no store,
/// writes no key and binds nothing.
fn check_config(config: &Config) -> ExitCode {
    if let Err(e) = apex_hub::llm::Gateway::from_config(&config.llm) {
        eprintln!("apex-hub: invalid configuration: `llm` {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("configuration ok");
    ExitCode::SUCCESS
}

/// `--healthcheck`: one `GET /livez` on `listen` (loopback for an unspecified address) with
/// a 3 s budget; exit 0 on a 200, else 1 with one line on stderr.
fn healthcheck(listen: std::net::SocketAddr) -> ExitCode {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let budget = std::time::Duration::from_secs(3);
    let answer = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, budget)?;
        s.set_read_timeout(Some(budget))?;
        s.set_write_timeout(Some(budget))?;
        write!(
            s,
            "GET /livez HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 64];
        let n = s.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..n]).into_owned())
    })();
    match answer {
        Ok(a) if a.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(a) => {
            let line = a.lines().next().unwrap_or("no answer");
            eprintln!("apex-hub: /livez on {addr} answered {line}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("apex-hub: /livez on {addr}: {e}");
            ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

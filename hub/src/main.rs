//! `apex-hub`: parses flags, loads config, starts logging, binds, and runs the hub.

use std::process::ExitCode;

use apex_hub::config::{Cli, Config, ensure_keys};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Exit code for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the task store cannot be opened: locked, unreadable or unreachable.
const EXIT_STORE: u8 = 74;

#[tokio::main]
async fn main() -> ExitCode {
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
    let mut config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("apex-hub: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let filter = match EnvFilter::try_new(&config.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("apex-hub: invalid configuration: `log_level` {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }
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
    if let Some(k) = &generated.api_key {
        println!("api key: {k}");
    }
    if let Some(k) = &generated.node_key {
        println!("node key: {k}");
    }
    println!("listening on http://{addr}");
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "apex-hub started");
    match apex_hub::run_with_store(config, listener, opened, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apex-hub: {e}");
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

//! The apex hub as a library: [`run`] serves the HTTP/SSE APIs and the node channel on an
//! already-bound listener until a shutdown future completes. `main.rs` only parses flags,
//! loads config and calls it; tests call it directly.

pub mod cluster;
pub mod config;
pub mod events;
pub mod http;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod scheduler;
pub mod store;
pub mod telemetry;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::{Cluster, ClusterOptions};
use crate::config::{Cli, Config};
use crate::http::AppState;
use crate::ops::Ops;
use crate::ops::live::ApplyHook;
use crate::store::MemoryStore;

/// Builds the engine for a validated config.
pub fn cluster_for(config: &Config) -> Cluster {
    Cluster::new(
        ClusterOptions {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            heartbeat_interval: config.heartbeat_interval(),
            heartbeat_timeout: config.heartbeat_timeout(),
            default_node_max_concurrent_tasks: config.default_node_max_concurrent_tasks,
            vcp_max_concurrent_tasks: config.vcp_max_concurrent_tasks,
            allow_internal_request_file: config.allow_internal_request_file,
            outbound_queue_frames: config.outbound_queue_frames,
        },
        Box::new(MemoryStore::new()),
    )
}

/// Serves the hub on `listener` until `shutdown` completes, then closes node connections,
/// ends SSE streams and drains in-flight HTTP requests.
///
/// `config` must be validated and have at least one API key and one node key.
///
/// # Errors
/// I/O errors of the listener.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(config, listener, shutdown, RunOptions::default()).await
}

/// What `main.rs` adds to [`run`]: the flags (for `POST /v1/config/reload`) and hooks that
/// apply config changes outside the hub (the log filter).
#[derive(Default)]
pub struct RunOptions {
    /// The flags the hub was started with; reload re-reads their `--config` file.
    pub cli: Option<Cli>,
    /// Run on every config change before it is applied (e.g. swap the log filter).
    pub on_config_change: Vec<ApplyHook>,
    /// An already-bound listener for `metrics_listen` (else `run_with` binds it when set).
    pub metrics_listener: Option<TcpListener>,
}

/// [`run`] with [`RunOptions`]. Also serves `GET /metrics` on `config.metrics_listen` when set.
///
/// # Errors
/// I/O errors of the listeners.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: RunOptions,
) -> std::io::Result<()> {
    let cluster = cluster_for(&config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_listen = config.metrics_listen;
    let config = Arc::new(config);
    let ops = Ops::new(config.clone(), options.cli);
    for hook in options.on_config_change {
        ops.live.on_change(hook);
    }
    let state = AppState {
        cluster: cluster.clone(),
        config,
        shutdown: stop_rx.clone(),
        ops: ops.clone(),
    };
    let mut background = ops.start(&cluster, &stop_rx);
    let metrics_listener = match (options.metrics_listener, metrics_listen) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => Some(TcpListener::bind(addr).await?),
        (None, None) => None,
    };
    if let Some(l) = metrics_listener {
        tracing::info!(addr = %l.local_addr()?, "metrics listener started");
        let app = http::metrics_router(state.clone());
        let mut stop = stop_rx.clone();
        background.push(tokio::spawn(async move {
            let served = axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "metrics listener failed");
            }
        }));
    }
    let deadlines = tokio::spawn(deadline_loop(cluster.clone(), stop_rx.clone()));
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let closing = cluster.clone();
    // Small frames and responses must leave at once: no Nagle delay on any connection.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: closing node connections and streams");
            let _ = stop_tx.send(true);
            closing.close_all("hub shutting down");
        })
        .await;
    deadlines.abort();
    for b in background {
        b.abort();
    }
    result
}

/// Times out tasks at their deadlines.
async fn deadline_loop(cluster: Cluster, mut stop: watch::Receiver<bool>) {
    loop {
        let next = cluster
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_millis(500));
        // Re-check at least every 500 ms: new tasks may have earlier deadlines.
        let wake = next.min(Instant::now() + Duration::from_millis(500));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let n = cluster.expire(Instant::now());
        if n > 0 {
            tracing::info!(count = n, "tasks timed out");
        }
    }
}

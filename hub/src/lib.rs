//! The apex hub as a library: [`run`] serves the HTTP/SSE APIs and the node channel on an
//! already-bound listener until a shutdown future completes. `main.rs` only parses flags,
//! loads config and calls it; tests call it directly.

pub mod cluster;
pub mod config;
pub mod durable;
pub mod http;
pub mod model;
pub mod scheduler;
pub mod store;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::{Cluster, ClusterOptions};
use crate::config::Config;
use crate::durable::{Opened, StoreError};
use crate::http::AppState;
use crate::store::MemoryStore;

/// Builds an engine over a memory store for a validated config (tests).
pub fn cluster_for(config: &Config) -> Cluster {
    Cluster::new(cluster_options(config), Box::new(MemoryStore::new()))
}

/// Opens the store the config names (`store` key) and loads what it holds.
///
/// # Errors
/// [`StoreError`]: the data directory is locked by another hub, the store is unreadable or
/// Redis cannot be reached.
pub async fn open_store(config: &Config) -> Result<Opened, StoreError> {
    durable::open(&config.store_kind(), &config.data_dir).await
}

fn cluster_options(config: &Config) -> ClusterOptions {
    ClusterOptions {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        heartbeat_interval: config.heartbeat_interval(),
        heartbeat_timeout: config.heartbeat_timeout(),
        default_node_max_concurrent_tasks: config.default_node_max_concurrent_tasks,
        vcp_max_concurrent_tasks: config.vcp_max_concurrent_tasks,
        allow_internal_request_file: config.allow_internal_request_file,
        outbound_queue_frames: config.outbound_queue_frames,
    }
}

/// Serves the hub on `listener` until `shutdown` completes, then closes node connections,
/// ends SSE streams and drains in-flight HTTP requests.
///
/// `config` must be validated and have at least one API key and one node key.
///
/// # Errors
/// I/O errors of the listener; store errors (see [`open_store`]) as `io::Error`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let opened = open_store(&config)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    run_with_store(config, listener, opened, shutdown).await
}

/// [`run`] over an already opened store: restores its tasks first (recovery), then serves.
///
/// # Errors
/// I/O errors of the listener.
pub async fn run_with_store(
    config: Config,
    listener: TcpListener,
    opened: Opened,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let durability = opened.durability.clone();
    let cluster = Cluster::new_durable(cluster_options(&config), opened.store, opened.durability);
    let began = Instant::now();
    cluster.restore_nodes(opened.nodes);
    let restored = cluster.restore(opened.recovered);
    let restore_ms = began.elapsed().as_millis() as u64;
    if restored != Default::default() {
        tracing::info!(
            queued = restored.queued,
            awaiting_node = restored.awaiting_node,
            finished = restored.finished,
            restore_ms,
            store = durability.describe(),
            "tasks recovered from the store"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let grace = Duration::from_millis(config.recovery_grace_ms);
    let retention = Duration::from_secs(config.task_retention_hours.saturating_mul(3600));
    let state = AppState {
        cluster: cluster.clone(),
        config: Arc::new(config),
        shutdown: stop_rx.clone(),
    };
    let deadlines = tokio::spawn(deadline_loop(cluster.clone(), stop_rx.clone()));
    let upkeep = tokio::spawn(upkeep_loop(
        cluster.clone(),
        (restored.awaiting_node > 0).then_some(grace),
        retention,
    ));
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
    upkeep.abort();
    if let Err(e) = durability.flush(Duration::from_secs(5)).await {
        tracing::error!(error = %e, "task store not flushed at shutdown");
    }
    result
}

/// Ends the recovery grace period (when tasks await their nodes), then collects finished tasks
/// past their retention, at start and every minute.
async fn upkeep_loop(cluster: Cluster, grace: Option<Duration>, retention: Duration) {
    let started = Instant::now();
    let mut grace_end = grace.map(|g| started + g);
    loop {
        let n = cluster.collect_finished(retention);
        if n > 0 {
            tracing::info!(count = n, "finished tasks past retention collected");
        }
        let next_sweep = Instant::now() + Duration::from_secs(60);
        match grace_end {
            Some(at) if at <= next_sweep => {
                tokio::time::sleep_until(at.into()).await;
                let n = cluster.end_recovery_grace();
                if n > 0 {
                    tracing::warn!(count = n, "tasks not reclaimed by their nodes requeued");
                }
                grace_end = None;
            }
            _ => tokio::time::sleep_until(next_sweep.into()).await,
        }
    }
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

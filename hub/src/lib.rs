//! The apex hub as a library: [`run`] serves the HTTP/SSE APIs and the node channel on an
//! already-bound listener until a shutdown future completes. `main.rs` only parses flags,
//! loads config and calls it; tests call it directly.

pub mod cluster;
pub mod config;
pub mod http;
pub mod llm;
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
use crate::http::AppState;
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
    let cluster = cluster_for(&config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let gateway = llm::Gateway::from_config(&config.llm)
        .map_err(std::io::Error::other)?
        .with_backend(Arc::new(llm::node_models::NodeModels::new(cluster.clone())));
    let gateway = Arc::new(llm::GatewayHandle::new(gateway));
    let node_llm = Arc::new(llm::node_proxy::NodeProxy::new(
        config.node_llm.clone(),
        gateway.clone(),
    ));
    let probe = node_llm.clone();
    cluster.set_llm_probe(Arc::new(move || probe.available()));
    let state = AppState {
        cluster: cluster.clone(),
        llm: gateway,
        node_llm,
        config: Arc::new(config),
        shutdown: stop_rx.clone(),
    };
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

//! The operator surface's shared parts: the live configuration, the log channel's buffer, the
//! machine sampler, the hub's lifecycle (draining for `/readyz`), and the background loops that feed them ([`Ops::start`]).

pub mod lifecycle;
pub mod live;
pub mod logs;
pub mod system;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Cli, Config};
use crate::engine::Cluster;
pub use lifecycle::Lifecycle;
pub use live::LiveConfig;
pub use logs::LogHub;
pub use system::SystemSampler;

/// Handles of the operator surface; clone freely (everything inside is shared).
#[derive(Clone)]
pub struct Ops {
    /// The configuration in force, changeable at run time.
    pub live: LiveConfig,
    /// The log channel's ring buffer and broadcast.
    pub logs: Arc<LogHub>,
    /// CPU, memory, GPU and dispatch-rate figures.
    pub system: Arc<SystemSampler>,
    /// Serving or draining (`/readyz`, the shutdown sequence).
    pub lifecycle: Lifecycle,
}

impl Ops {
    /// Operator handles for a validated `config`; `cli` is what `POST /v1/config/reload`
    /// re-reads (`None`: reload is refused).
    pub fn new(config: Arc<Config>, cli: Option<Cli>) -> Self {
        let logs = Arc::new(LogHub::new(
            config.log_buffer_entries,
            config.stream_buffer_events,
        ));
        Self {
            live: LiveConfig::new(config, cli),
            logs,
            system: Arc::new(SystemSampler::new()),
            lifecycle: Lifecycle::new(),
        }
    }

    /// Starts the background loops (log forwarding, machine sampling, forgetting offline
    /// nodes); they end when `stop` flips to true.
    pub fn start(&self, cluster: &Cluster, stop: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(logs::forward_cluster_events(
                cluster.clone(),
                self.logs.clone(),
                stop.clone(),
            )),
            tokio::spawn(self.system.clone().run(stop.clone())),
            tokio::spawn(forget_offline_loop(
                cluster.clone(),
                self.live.clone(),
                stop.clone(),
            )),
            tokio::spawn(follow_liveness(
                cluster.clone(),
                self.live.clone(),
                stop.clone(),
            )),
        ]
    }
}

/// Keeps the liveness settings the engine announces in `hubInfo` equal to the live config.
async fn follow_liveness(cluster: Cluster, live: LiveConfig, mut stop: watch::Receiver<bool>) {
    let mut rx = live.subscribe();
    loop {
        {
            let c = rx.borrow_and_update();
            cluster.set_liveness(c.heartbeat_interval(), c.heartbeat_timeout());
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Forgets nodes offline for longer than `offline_node_retention_ms` (read live each round).
async fn forget_offline_loop(cluster: Cluster, live: LiveConfig, mut stop: watch::Receiver<bool>) {
    loop {
        let ms = live.current().offline_node_retention_ms;
        let pause = if ms == 0 {
            Duration::from_secs(1)
        } else {
            let removed = cluster.forget_offline(Duration::from_millis(ms));
            if !removed.is_empty() {
                tracing::info!(count = removed.len(), "forgot offline nodes");
            }
            Duration::from_millis((ms / 4).clamp(50, 5000))
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

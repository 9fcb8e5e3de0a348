//! apex-node: a worker that connects to an apex hub over WebSocket, registers its built-in
//! tools, runs the tasks the hub assigns, and drains cleanly on shutdown.
//!
//! [`run`] is the whole node; `main.rs` only parses flags, loads [`Config`], sets up logging
//! and calls it. Module map:
//! - [`config`]: layered configuration, validated once;
//! - [`identity`]: the persistent node id;
//! - [`connection`]: the WebSocket session and the reconnect loop;
//! - [`executor`]: task running, concurrency, timeouts, cancellation, draining;
//! - [`outbox`]: results held until the hub acknowledges them;
//! - [`tools`]: the built-in tools and their registry;
//! - [`stats`]: task counters and machine load for heartbeats;
//! - [`backoff`]: reconnect delays;
//! - [`telemetry`]: OpenTelemetry export and the per-task span.

use std::future::Future;
use std::sync::Arc;

pub mod backoff;
pub mod config;
pub mod connection;
pub mod executor;
pub mod identity;
pub mod outbox;
pub mod stats;
pub mod telemetry;
pub mod tools;

pub use config::Config;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node id could not be read or saved.
    #[error(transparent)]
    Identity(#[from] identity::Error),
    /// The tools could not be set up.
    #[error(transparent)]
    Tools(#[from] tools::Error),
}

/// Runs the node until `shutdown` completes and the drain is over: connects to the hubs in
/// turn, registers, serves tasks, and reconnects with backoff when a connection drops.
///
/// # Errors
/// [`Error`] if the node id or the tools cannot be set up; connection problems are retried,
/// never returned.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    // wss:// needs a process-wide TLS provider; another part of the process may have installed
    // one already, which is as good.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Held until the node stops: one process per data directory (and so per node id).
    let _lock = identity::lock(&config.data_dir)?;
    let node_id = identity::load_or_create(&config.data_dir)?;
    let registry = Arc::new(tools::Registry::builtin(&config)?);
    tracing::info!(
        node_id = %node_id,
        hub = %config.hubs.join(", "),
        name = %config.name,
        tools = %registry.names().join(","),
        max_concurrent_tasks = config.max_concurrent_tasks,
        "apex-node starting"
    );
    connection::Node::new(config, node_id, registry)
        .run(shutdown)
        .await;
    Ok(())
}

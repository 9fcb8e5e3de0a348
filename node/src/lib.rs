//! apex-node: a worker that connects to an apex hub over WebSocket, registers its built-in
//! tools, runs the tasks the hub assigns, and drains cleanly on shutdown.
//!
//! [`run`] is the whole node; `main.rs` only parses flags, loads [`Config`], sets up logging
//! and calls it. Module map:
//! - [`config`]: layered configuration, validated once;
//! - [`identity`]: the persistent node id;
//! - [`connection`]: the WebSocket session and the reconnect loop;
//! - [`discovery`]: finding the hub over mDNS (`--hub auto`);
//! - [`executor`]: task running, concurrency, timeouts, cancellation, draining;
//! - [`outbox`]: results held until the hub acknowledges them;
//! - [`tools`]: the built-in tools and their registry;
//! - [`mcp`]: MCP servers mounted over stdio, their tools offered as `<server>.<tool>`;
//! - [`llm`]: the client of the hub's LLM gateway and the local model server (`--llm-upstream`);
//! - [`stats`]: task counters and machine load for heartbeats;
//! - [`backoff`]: reconnect delays;
//! - [`telemetry`]: OpenTelemetry export and the per-task span;
//! - [`systemd`]: `Type=notify` readiness, stopping and watchdog notifications.

use std::future::Future;
use std::sync::Arc;

pub mod backoff;
pub mod config;
pub mod connection;
pub mod discovery;
pub mod executor;
pub mod identity;
pub mod llm;
pub mod mcp;
pub mod outbox;
pub mod plugins;
pub mod stats;
pub mod systemd;
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
    let mut registry = tools::Registry::builtin(&config)?;
    let (llm_client, llm_requests) = llm::LlmClient::new(config.llm_model.clone());
    registry.add(tools::llm::Summarize::new(llm_client.clone()));
    registry.add(tools::agent::AgentRun::new(llm_client.clone()));
    let mut models = None;
    if let Some(base) = &config.llm_upstream {
        let upstream = llm::Upstream::new(base).map_err(tools::Error::Setup)?;
        registry.add(tools::llm::Chat::new(upstream.clone()));
        models = Some(watch_models(upstream).await);
    }
    if !config.plugin_dirs.is_empty() {
        let loaded = plugins::load(&config.plugin_dirs, &registry.names());
        tracing::info!(
            loaded = loaded.tools.len(),
            disabled = loaded.disabled.len(),
            skipped = loaded.skipped.len(),
            "plugins"
        );
        for tool in loaded.tools {
            registry.add(tool);
        }
    }
    for tool in mcp::start(&config.mcp_servers).await {
        registry.add_shared(tool);
    }
    let registry = Arc::new(registry);
    tracing::info!(
        node_id = %node_id,
        hub = %config.hub_description(),
        name = %config.name,
        tools = %registry.names().join(","),
        max_concurrent_tasks = config.max_concurrent_tasks,
        "apex-node starting"
    );
    let config_hubs = config.hub_description();
    let mut node =
        connection::Node::new(config, node_id, registry).with_llm_client(llm_client, llm_requests);
    if let Some(models) = models {
        node = node.with_models(models);
    }
    systemd::ready(&format!("connecting to {}", config_hubs));
    node.run(shutdown).await;
    Ok(())
}

/// How often the local model server's model list is read again.
pub const MODELS_REFRESH: std::time::Duration = std::time::Duration::from_secs(15);

/// Lists the local server's models once now (so the first registration carries them), then
/// every [`MODELS_REFRESH`] in the background; the receiver sees each change. A server that
/// cannot be read keeps the last list (empty at first) and is logged.
async fn watch_models(upstream: llm::Upstream) -> tokio::sync::watch::Receiver<Vec<String>> {
    let first = match upstream.models().await {
        Ok(m) => {
            tracing::info!(upstream = %upstream.base(), models = %m.join(","), "hosting models");
            m
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the local model server's models; retrying");
            Vec::new()
        }
    };
    let (tx, rx) = tokio::sync::watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(MODELS_REFRESH).await;
            match upstream.models().await {
                Ok(m) => {
                    tx.send_if_modified(|cur| {
                        if *cur == m {
                            return false;
                        }
                        tracing::info!(models = %m.join(","), "hosted models changed");
                        *cur = m;
                        true
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot list the local model server's models"),
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

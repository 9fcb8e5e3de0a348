//! The apex hub as a library: [`run`] serves the HTTP/SSE APIs and the node channel on an
//! already-bound listener until a shutdown future completes. `main.rs` only parses flags,
//! loads config and calls it; tests call it directly.

pub mod agents;
pub mod chat;
pub mod config;
pub mod discovery;
pub mod durable;
pub mod engine;
pub mod events;
pub mod http;
pub mod identity;
pub mod limits;
pub mod llm;
pub mod mcp;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod ops;
pub mod plugins;
pub mod principal;
pub mod records;
pub mod research;
pub mod scheduler;
pub mod schedules;
pub mod shared;
pub mod store;
pub mod systemd;
pub mod tasks;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Cli, Config};
use crate::durable::Opened;
use crate::engine::{Cluster, ClusterOptions};
use crate::http::AppState;
use crate::ops::Ops;
use crate::ops::live::ApplyHook;
use crate::store::MemoryStore;

/// Builds an engine over a memory store for a validated config (tests).
pub fn cluster_for(config: &Config) -> Cluster {
    Cluster::new(cluster_options(config), Box::new(MemoryStore::new()))
}

/// Opens the store the config names (`store` key) and loads what it holds.
///
/// # Errors
/// [`store::Error`]: the data directory is locked by another hub, the store is unreadable or
/// Redis cannot be reached.
pub async fn open_store(config: &Config) -> Result<Opened, store::Error> {
    if config.is_shared()
        && let durable::StoreKind::Redis(url) = config.store_kind()
    {
        let hub_id = durable::hub_id(&config.data_dir)?;
        return shared::open_hub_with(&url, &hub_id, config.shared_lease_ttl_ms).await;
    }
    durable::open(&config.store_kind(), &config.data_dir).await
}

fn cluster_options(config: &Config) -> ClusterOptions {
    ClusterOptions {
        callbacks: None,
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
    /// An already opened store (`main.rs` opens it first to report store errors before
    /// listening); else `run_with` opens the one the config names.
    pub store: Option<Opened>,
    /// Called once, when the hub starts serving requests (`main.rs` tells systemd `READY=1`).
    pub on_ready: Option<Box<dyn FnOnce() + Send>>,
}

/// [`run`] with [`RunOptions`]. Also serves `GET /metrics` on `config.metrics_listen` when set.
///
/// # Errors
/// I/O errors of the listeners; store errors (see [`open_store`]) as `io::Error`.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: RunOptions,
) -> std::io::Result<()> {
    let opened = match options.store {
        Some(o) => o,
        None => open_store(&config)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?,
    };
    let durability = opened.durability.clone();
    let shared = opened.shared;
    // Users, keys and revocations live in the backend the tasks live in.
    let records = records::RecordStore::open(&config.store_kind(), &config.data_dir)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let identity = identity::Identity::open(records.clone(), &config.auth)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    identity
        .warm()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let public_url = match &config.public_url {
        Some(u) => u.clone(),
        None => {
            let mut addr = listener.local_addr()?;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    };
    let plugins = plugins::Plugins::open(records.clone(), &public_url)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let cluster = Cluster::new_durable(
        ClusterOptions {
            callbacks: Some(Arc::new(plugins.signer().clone())),
            ..cluster_options(&config)
        },
        opened.store,
        opened.durability,
    );
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
    let grace = Duration::from_millis(config.recovery_grace_ms);
    let drain_for = Duration::from_millis(config.shared_shutdown_drain_ms);
    let delay = Duration::from_millis(config.shutdown_delay_ms);
    let retention = Duration::from_secs(config.task_retention_hours.saturating_mul(3600));
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_listen = config.metrics_listen;
    let discovery = config.discovery;
    let discovery_name = config.discovery_name.clone();
    let config = Arc::new(config);
    let ops = Ops::new(config.clone(), options.cli);
    for hook in options.on_config_change {
        ops.live.on_change(hook);
    }
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
    ops.live.on_change(llm_reload_hook(
        &config,
        cluster.clone(),
        gateway.clone(),
        node_llm.clone(),
    ));
    let limits = Arc::new(open_limiter(&config).await?);
    // Registered last, so a change another hook refuses is not applied here either.
    let reloaded = limits.clone();
    ops.live.on_change(Box::new(move |c: &Config| {
        if *reloaded.config() != c.rate_limits {
            reloaded.set_config(c.rate_limits.clone());
            tracing::info!("rate limits changed");
        }
        Ok(())
    }));
    let shared_redis = shared.as_ref().map(|h| h.redis.clone());
    let tasks = match &shared_redis {
        Some(redis) => tasks::TaskService::shared(cluster.clone(), redis.clone(), stop_rx.clone()),
        None => tasks::TaskService::local(cluster.clone(), stop_rx.clone()),
    };
    let tasks = tasks.with_plugins(plugins.clone());
    let notifier = notify::Notifier::new(config.ws_queue_len, shared_redis.clone());
    let schedules = schedules::Schedules::new(records.clone(), tasks.clone(), notifier.clone());
    let agents = agents::Agents::new(
        records.clone(),
        tasks.clone(),
        gateway.clone(),
        config.clone(),
    );
    let shared_url = shared.as_ref().map(|h| h.url.clone());
    let identity_sync = identity::spawn_sync(identity.clone(), stop_rx.clone());
    let plugins_sync = plugins::spawn_sync(plugins.clone(), stop_rx.clone());
    let memory = memory::Memory::open(records.clone(), gateway.clone(), &config)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let chat = chat::ChatService::new(
        records.clone(),
        gateway.clone(),
        tasks.clone(),
        plugins.clone(),
        config.clone(),
        memory.chat_hooks(),
    );
    chat.spawn_retention(stop_rx.clone());
    let memory_loops = memory.spawn(stop_rx.clone());
    let research = research::Research::new(
        records.clone(),
        tasks.clone(),
        Arc::new(agents.clone()),
        Some(memory.clone()),
        config.research.clone(),
        stop_rx.clone(),
    );
    let state = AppState {
        chat,
        memory,
        plugins,
        identity,
        limits: limits.clone(),
        records,
        shared: shared_redis,
        tasks,
        cluster: cluster.clone(),
        llm: gateway,
        node_llm,
        config,
        shutdown: stop_rx.clone(),
        ops: ops.clone(),
        notifier: notifier.clone(),
        schedules: schedules.clone(),
        research: research.clone(),
        agents,
    };
    let mut background = ops.start(&cluster, &stop_rx);
    background.push(identity_sync);
    background.push(plugins_sync);
    background.extend(memory_loops);
    background.push(tokio::spawn(limits.sweep_loop()));
    background.extend(notify::spawn(
        notifier,
        cluster.clone(),
        shared_url,
        stop_rx.clone(),
    ));
    background.push(tokio::spawn(research::resume_loop(research)));
    background.push(tokio::spawn(schedules::run_loop(
        schedules,
        stop_rx.clone(),
    )));
    // Shared mode's graceful exit: hand back, drain, then leave (see `shared::drain`).
    let shared_exit = shared.as_ref().map(|h| (h.redis.clone(), h.claims.clone()));
    if let Some(h) = shared {
        background.extend(shared::spawn(
            h,
            cluster.clone(),
            retention,
            stop_rx.clone(),
        ));
    }
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
    let upkeep = tokio::spawn(upkeep_loop(
        cluster.clone(),
        (restored.awaiting_node > 0).then_some(grace),
        retention,
    ));
    // Advertised once the listener is bound (it is: `run` takes a bound one); withdrawn when
    // the graceful shutdown begins, so no node finds a hub that is going away.
    let bound = listener.local_addr()?;
    let advertiser = if discovery {
        let name = discovery_name.unwrap_or_else(discovery::default_name);
        match discovery::advertise(&name, bound) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "cannot advertise the hub on the local network (mDNS); running without discovery");
                None
            }
        }
    } else {
        None
    };
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let closing = cluster.clone();
    let draining = shared_exit.clone();
    let lifecycle = ops.lifecycle.clone();
    // Small frames and responses must leave at once: no Nagle delay on any connection.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    if let Some(ready) = options.on_ready {
        ready();
    }
    // The shutdown order (see `ops::lifecycle`): not ready at once, still serving for
    // `shutdown_delay_ms` (load balancers take the hub out), then refuse and drain.
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            lifecycle.begin_draining();
            if let Some(a) = advertiser {
                a.stop().await;
            }
            if !delay.is_zero() {
                tracing::info!(
                    shutdown_delay_ms = delay.as_millis() as u64,
                    "shutdown requested: /readyz answers 503; still serving until the delay ends"
                );
                tokio::time::sleep(delay).await;
            }
            tracing::info!(
                "shutting down: refusing submissions, closing node connections and streams"
            );
            let _ = stop_tx.send(true);
            if let Some((redis, claims)) = &draining {
                let (handed, held) = shared::drain(redis, claims, &closing, drain_for).await;
                tracing::info!(
                    handed_back = handed,
                    still_held = held,
                    "shared mode: drained"
                );
            }
            closing.close_all("hub shutting down");
        })
        .await;
    deadlines.abort();
    upkeep.abort();
    for b in background {
        b.abort();
    }
    if let Err(e) = durability.flush(Duration::from_secs(5)).await {
        tracing::error!(error = %e, "task store not flushed at shutdown");
    }
    if let Some((redis, claims)) = &shared_exit {
        shared::leave(redis, claims).await;
    }
    result
}

/// The rate limiter the config asks for: counting in the shared Redis in shared mode (so a
/// limit holds across hubs), else in this process.
///
/// # Errors
/// Redis cannot be reached (as `io::Error`).
async fn open_limiter(config: &Config) -> std::io::Result<limits::Limiter> {
    if config.is_shared()
        && let durable::StoreKind::Redis(url) = config.store_kind()
    {
        return limits::Limiter::redis(&url, config.rate_limits.clone())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()));
    }
    Ok(limits::Limiter::memory(config.rate_limits.clone()))
}

/// The config hook that applies `llm` (providers, aliases, fallbacks) and `node_llm` (quotas)
/// changes live: a new gateway (calls in flight finish on the old one) and new quotas.
/// A provider that cannot be built rejects the whole change, naming `llm`.
fn llm_reload_hook(
    start: &Config,
    cluster: Cluster,
    gateway: Arc<llm::GatewayHandle>,
    node_llm: Arc<llm::node_proxy::NodeProxy>,
) -> ApplyHook {
    let applied = parking_lot::Mutex::new((start.llm.clone(), start.node_llm.clone()));
    Box::new(move |c: &Config| {
        let mut applied = applied.lock();
        if c.llm != applied.0 {
            let g = llm::Gateway::from_config(&c.llm)
                .map_err(|e| ("llm".to_owned(), e.to_string()))?
                .with_backend(Arc::new(llm::node_models::NodeModels::new(cluster.clone())));
            gateway.replace(g);
            applied.0 = c.llm.clone();
            tracing::info!(
                providers = c.llm.providers.len(),
                "LLM gateway reconfigured"
            );
        }
        if c.node_llm != applied.1 {
            node_llm.set_quotas(c.node_llm.clone());
            applied.1 = c.node_llm.clone();
            tracing::info!("node LLM quotas changed");
        }
        Ok(())
    })
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

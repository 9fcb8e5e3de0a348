//! The WebSocket session with the hub and the reconnect loop around it: registration,
//! heartbeats, task frames in and results out (re-sent until acknowledged), MessagePack
//! switch-over, and the drain on shutdown.
//!
//! The session is generic over any `Sink + Stream` of WebSocket messages; it always keeps
//! reading, so WebSocket pings are answered while tasks run.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use apex_protocol::codec::{self, Encoding, Frame};
use apex_protocol::{
    Heartbeat, HeartbeatStatus, HubMessage, LlmRequest, ModelSpec, NodeDrain, NodeMessage,
    NodeRegister, NodeType, NodeUnregister,
};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::executor::{Event, Executor};
use crate::identity;
use crate::llm::LlmClient;
use crate::outbox::Outbox;
use crate::stats::{LoadSampler, TaskCounters};
use crate::tools::Registry;

/// How long a WebSocket connect (TCP, TLS, upgrade) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the node waits for `node_registered` before reconnecting.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat period when the hub suggests none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(1000);
/// Shortest heartbeat period, whatever the hub suggests.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(500);
/// After the drain timeout, how much longer the node tries to deliver held results.
pub const RESULT_GRACE: Duration = Duration::from_secs(5);
/// How long the node waits for `node_unregistered` (and then the close reply).
pub const UNREGISTER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection attempt failed (the node retries; none of these is fatal).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hub answered the upgrade with 401.
    #[error("hub rejected the node key (http 401)")]
    Unauthorized,
    /// The hub answered the upgrade with another status.
    #[error("hub refused the websocket upgrade with http {0}")]
    Refused(u16),
    /// Connecting took longer than [`CONNECT_TIMEOUT`].
    #[error("connection timed out")]
    Timeout,
    /// The URL or key cannot form a request.
    #[error("cannot build the upgrade request: {0}")]
    Request(String),
    /// A network or protocol error.
    #[error("{0}")]
    WebSocket(#[from] tungstenite::Error),
}

/// A WebSocket client connection to a hub.
pub type HubSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `url` with `Authorization: Bearer <key>`.
///
/// # Errors
/// [`Error`] saying why the hub could not be reached or refused.
pub async fn connect(url: &str, key: &str) -> Result<HubSocket, Error> {
    let mut request = url
        .into_client_request()
        .map_err(|e| Error::Request(e.to_string()))?;
    let auth = HeaderValue::from_str(&format!("Bearer {key}"))
        .map_err(|_| Error::Request("the key is not a valid header value".into()))?;
    request.headers_mut().insert(header::AUTHORIZATION, auth);
    let attempt = tokio_tungstenite::connect_async_with_config(request, None, true);
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Err(_) => Err(Error::Timeout),
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(response))) => {
            if response.status() == StatusCode::UNAUTHORIZED {
                Err(Error::Unauthorized)
            } else {
                Err(Error::Refused(response.status().as_u16()))
            }
        }
        Ok(Err(e)) => Err(Error::WebSocket(e)),
    }
}

/// The shutdown future, polled until it fires once.
struct Shutdown {
    signal: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Shutdown {
    fn new(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        Self {
            signal: Some(Box::pin(signal)),
        }
    }

    /// Completes once when the signal fires, then never again.
    async fn fired(&mut self) {
        match self.signal.as_mut() {
            Some(s) => {
                s.as_mut().await;
                self.signal = None;
            }
            None => std::future::pending().await,
        }
    }
}

/// Drain progress after the shutdown signal.
#[derive(Debug, Clone, Copy)]
struct Drain {
    /// When running tasks are aborted.
    deadline: Instant,
    /// Whether they were.
    aborted: bool,
    /// When the node stops waiting for held results to be acknowledged: [`RESULT_GRACE`]
    /// after the deadline, or after the last task ended if that is sooner.
    give_up_at: Instant,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The connection dropped; `registered` says whether registration had succeeded.
    Lost { registered: bool },
    /// The drain completed and the node said goodbye.
    Finished,
}

/// What woke a session up.
enum Wake {
    Frame(Option<Result<Message, tungstenite::Error>>),
    Event(Event),
    Heartbeat,
    Shutdown,
    Timer,
    Llm(LlmRequest),
    ModelsChanged,
}

/// The node's LLM side: the gateway client's request queue and the hosted-model list.
#[derive(Default)]
struct LlmSide {
    client: Option<LlmClient>,
    requests: Option<mpsc::UnboundedReceiver<LlmRequest>>,
    models: Option<watch::Receiver<Vec<String>>>,
}

/// The next request of the gateway client (never, without one).
async fn next_llm(rx: &mut Option<mpsc::UnboundedReceiver<LlmRequest>>) -> LlmRequest {
    match rx {
        Some(rx) => match rx.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Fires when the hosted-model list changes (never, without one).
async fn models_changed(rx: &mut Option<watch::Receiver<Vec<String>>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Outcome of something awaited while not connected.
enum Offline<T> {
    Done(T),
    Finished,
}

/// Outcome of one `--hub auto` browse.
enum Discovered {
    /// Connect to this URL.
    Hub(String),
    /// None found; the delay was waited out: browse again.
    Retry,
    /// The drain ended while browsing or waiting.
    Finished,
}

/// State of one connection.
struct Session<S> {
    ws: S,
    encoding: Encoding,
    registered: bool,
    registered_once: bool,
    register_deadline: Instant,
    heartbeat: Option<Interval>,
    unregister_deadline: Option<Instant>,
    unregistered: bool,
}

impl<S> Session<S>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    async fn send(&mut self, msg: NodeMessage) -> Result<(), tungstenite::Error> {
        let frame = match codec::encode(&msg, self.encoding) {
            Ok(f) => f,
            Err(e) => {
                error!(error = %e, kind = msg.type_name(), "cannot encode a frame; dropped");
                return Ok(());
            }
        };
        let message = match frame {
            Frame::Text(t) => Message::Text(t.into()),
            Frame::Binary(b) => Message::Binary(b.into()),
        };
        self.ws.send(message).await
    }

    fn lost(&self) -> SessionEnd {
        SessionEnd::Lost {
            registered: self.registered_once,
        }
    }
}

async fn tick(heartbeat: &mut Option<Interval>) {
    match heartbeat {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// The node: identity, tools, executor and the results it still owes the hub.
pub struct Node {
    config: Arc<Config>,
    node_id: String,
    registry: Arc<Registry>,
    executor: Executor,
    events: Option<mpsc::UnboundedReceiver<Event>>,
    counters: Arc<TaskCounters>,
    load: LoadSampler,
    outbox: Outbox,
    drain: Option<Drain>,
    llm: LlmSide,
}

impl Node {
    /// A node with id `node_id` offering `registry`'s tools.
    pub fn new(config: Config, node_id: String, registry: Arc<Registry>) -> Self {
        let counters = Arc::new(TaskCounters::default());
        let (executor, events) = Executor::new(
            registry.clone(),
            config.max_concurrent_tasks,
            Duration::from_millis(config.default_task_timeout_ms),
            counters.clone(),
        );
        Self {
            config: Arc::new(config),
            node_id,
            registry,
            executor,
            events: Some(events),
            counters,
            load: LoadSampler::new(),
            outbox: Outbox::new(),
            drain: None,
            llm: LlmSide::default(),
        }
    }

    /// Serves `client`'s calls of the hub's LLM gateway: sends its queued `llm_request`s
    /// while registered and routes the answer frames back; calls in flight fail when a
    /// connection drops.
    pub fn with_llm_client(
        mut self,
        client: LlmClient,
        requests: mpsc::UnboundedReceiver<LlmRequest>,
    ) -> Self {
        self.llm.client = Some(client);
        self.llm.requests = Some(requests);
        self
    }

    /// Advertises the models in `models` (`node_register.models`), registering again when
    /// the list changes.
    pub fn with_models(mut self, models: watch::Receiver<Vec<String>>) -> Self {
        self.llm.models = Some(models);
        self
    }

    /// Connects, serves and reconnects until `shutdown` fires and the drain completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let Some(mut events) = self.events.take() else {
            return;
        };
        let mut shutdown = Shutdown::new(shutdown);
        let mut backoff = Backoff::default();
        let hubs = self.config.hubs.clone();
        let key = self.config.key.clone();
        let mut hub_index = 0usize;
        loop {
            let url = if self.config.discover {
                match self
                    .discover(&mut backoff, &mut events, &mut shutdown)
                    .await
                {
                    Discovered::Finished => return,
                    Discovered::Retry => continue,
                    Discovered::Hub(url) => url,
                }
            } else {
                hubs[hub_index % hubs.len()].clone()
            };
            let url = &url;
            let attempt = connect(url, &key);
            let connected = match self.offline(attempt, &mut events, &mut shutdown).await {
                Offline::Finished => return,
                Offline::Done(c) => c,
            };
            let failure = match connected {
                Ok(ws) => {
                    info!(hub = %url, "connected to hub");
                    let end = self.session(ws, &mut events, &mut shutdown).await;
                    if let Some(c) = &self.llm.client {
                        c.fail_all("the connection to the hub was lost");
                    }
                    match end {
                        SessionEnd::Finished => return,
                        SessionEnd::Lost { registered } => {
                            if registered {
                                backoff.reset();
                            } else {
                                hub_index = hub_index.wrapping_add(1);
                            }
                        }
                    }
                    None
                }
                Err(e) => {
                    hub_index = hub_index.wrapping_add(1);
                    Some(e)
                }
            };
            let delay = backoff.next_delay(&mut rand::rng());
            let retry_in_ms = delay.as_millis() as u64;
            match failure {
                Some(Error::Unauthorized) => {
                    error!(hub = %url, retry_in_ms, "hub rejected the node key (http 401); check --key");
                }
                Some(e) => warn!(hub = %url, error = %e, retry_in_ms, "cannot connect to hub"),
                None => info!(retry_in_ms, "reconnecting to hub"),
            }
            let wait = tokio::time::sleep(delay);
            if let Offline::Finished = self.offline(wait, &mut events, &mut shutdown).await {
                return;
            }
        }
    }

    /// `--hub auto`: one mDNS browse for a hub. When none answers (or mDNS cannot run), says
    /// so and waits out the next reconnect delay, so a node started before its hub joins it
    /// later.
    async fn discover(
        &mut self,
        backoff: &mut Backoff,
        events: &mut mpsc::UnboundedReceiver<Event>,
        shutdown: &mut Shutdown,
    ) -> Discovered {
        let timeout = Duration::from_millis(self.config.discovery_timeout_ms);
        let browse = crate::discovery::find_hub(timeout);
        let outcome = match self.offline(browse, events, shutdown).await {
            Offline::Finished => return Discovered::Finished,
            Offline::Done(o) => o,
        };
        let delay = match outcome {
            Ok(Some(found)) => {
                info!(
                    hub = %found.url,
                    instance = %found.instance,
                    version = found.version.as_deref().unwrap_or("?"),
                    proto = found.proto.as_deref().unwrap_or("?"),
                    "found a hub on the local network (mDNS)"
                );
                return Discovered::Hub(found.url);
            }
            Ok(None) => {
                let delay = backoff.next_delay(&mut rand::rng());
                warn!(
                    service = crate::discovery::SERVICE_TYPE,
                    browsed_ms = self.config.discovery_timeout_ms,
                    retry_in_ms = delay.as_millis() as u64,
                    "no hub found on the local network (mDNS); is the hub running with discovery = true on this network? looking again"
                );
                delay
            }
            Err(e) => {
                let delay = backoff.next_delay(&mut rand::rng());
                warn!(
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot look for a hub on the local network (mDNS); trying again"
                );
                delay
            }
        };
        match self
            .offline(tokio::time::sleep(delay), events, shutdown)
            .await
        {
            Offline::Finished => Discovered::Finished,
            Offline::Done(()) => Discovered::Retry,
        }
    }

    /// Awaits `fut` while not connected, keeping results, starting the drain on shutdown and
    /// aborting tasks at the drain deadline. `Finished` once a drain has nothing left to do
    /// (or gave up delivering results).
    async fn offline<T>(
        &mut self,
        fut: impl Future<Output = T>,
        events: &mut mpsc::UnboundedReceiver<Event>,
        shutdown: &mut Shutdown,
    ) -> Offline<T> {
        let mut fut = std::pin::pin!(fut);
        loop {
            self.drain_abort_if_due();
            let idle = self.executor.is_idle() && events.is_empty();
            if idle {
                self.drain_idle();
            }
            if let Some(d) = self.drain
                && idle
                && (self.outbox.is_empty() || Instant::now() >= d.give_up_at)
            {
                if !self.outbox.is_empty() {
                    warn!(
                        results = self.outbox.len(),
                        "hub unreachable; results of finished tasks were not delivered"
                    );
                }
                info!("drain complete; stopping");
                return Offline::Finished;
            }
            let timer = self.drain_timer();
            tokio::select! {
                r = &mut fut => return Offline::Done(r),
                Some(ev) = events.recv() => {
                    if let Event::Result(r) = ev {
                        self.outbox.push(r);
                    }
                }
                _ = shutdown.fired() => self.begin_drain(),
                _ = tokio::time::sleep_until(timer) => {}
            }
        }
    }

    fn begin_drain(&mut self) {
        if self.drain.is_some() {
            return;
        }
        let now = Instant::now();
        let deadline = now + Duration::from_millis(self.config.drain_timeout_ms);
        info!(
            active_tasks = self.executor.active(),
            drain_timeout_ms = self.config.drain_timeout_ms,
            "shutdown requested; draining"
        );
        self.executor.start_drain();
        self.drain = Some(Drain {
            deadline,
            aborted: false,
            give_up_at: deadline + RESULT_GRACE,
        });
    }

    fn drain_abort_if_due(&mut self) {
        if let Some(d) = self.drain.as_mut()
            && !d.aborted
            && Instant::now() >= d.deadline
        {
            d.aborted = true;
            let active = self.executor.active();
            if active > 0 {
                warn!(
                    active_tasks = active,
                    "drain timeout passed; aborting remaining tasks"
                );
            }
            self.executor.abort_all();
        }
    }

    /// Nothing runs any more: held results get [`RESULT_GRACE`] to be acknowledged.
    fn drain_idle(&mut self) {
        if let Some(d) = self.drain.as_mut() {
            d.give_up_at = d.give_up_at.min(Instant::now() + RESULT_GRACE);
        }
    }

    /// Next drain instant to wake up for.
    fn drain_timer(&self) -> Instant {
        match self.drain {
            Some(d) if !d.aborted => d.deadline.min(d.give_up_at),
            Some(d) => d.give_up_at,
            None => far_future(),
        }
    }

    fn register_message(&mut self, running: Vec<String>) -> NodeMessage {
        let mut inflight = running;
        for id in self.outbox.task_ids() {
            if !inflight.iter().any(|x| x == id) {
                inflight.push(id.to_owned());
            }
        }
        let active = self.executor.active();
        NodeRegister {
            node_id: Some(self.node_id.clone()),
            name: self.config.name.clone(),
            node_type: NodeType::Worker,
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            capabilities: self.registry.names(),
            tools: self.registry.specs(),
            personality: None,
            config: None,
            max_concurrent_tasks: Some(self.config.max_concurrent_tasks),
            stats: Some(self.counters.snapshot(active, self.load.sample())),
            encoding: self.config.msgpack.then_some(Encoding::Msgpack),
            inflight: Some(inflight),
            protocol_version: Some(apex_protocol::PROTOCOL_VERSION.to_owned()),
            models: self
                .llm
                .models
                .as_mut()
                .map(|m| m.borrow_and_update().clone())
                .unwrap_or_default()
                .into_iter()
                .map(ModelSpec::Id)
                .collect(),
        }
        .into()
    }

    fn heartbeat_message(&mut self) -> NodeMessage {
        let active = self.executor.active();
        let status = if active >= self.config.max_concurrent_tasks as usize {
            HeartbeatStatus::Busy
        } else {
            HeartbeatStatus::Online
        };
        Heartbeat {
            node_id: self.node_id.clone(),
            status: Some(status),
            stats: Some(self.counters.snapshot(active, self.load.sample())),
        }
        .into()
    }

    /// Serves one connection until it drops or the drain completes.
    async fn session<S>(
        &mut self,
        ws: S,
        events: &mut mpsc::UnboundedReceiver<Event>,
        shutdown: &mut Shutdown,
    ) -> SessionEnd
    where
        S: Stream<Item = Result<Message, tungstenite::Error>>
            + Sink<Message, Error = tungstenite::Error>
            + Unpin,
    {
        let mut s = Session {
            ws,
            encoding: Encoding::Json,
            registered: false,
            registered_once: false,
            register_deadline: Instant::now() + REGISTER_TIMEOUT,
            heartbeat: None,
            unregister_deadline: None,
            unregistered: false,
        };
        // Snapshot running tasks before draining finished results: the executor reports a
        // result before a task leaves `running`, so every task is in one of the two.
        let running = self.executor.running_ids();
        while let Ok(ev) = events.try_recv() {
            if let Event::Result(r) = ev {
                self.outbox.push(r);
            }
        }
        self.outbox.mark_all_unsent();
        let register = self.register_message(running);
        if let Err(e) = s.send(register).await {
            warn!(error = %e, "cannot send node_register");
            return s.lost();
        }
        loop {
            match self.drain_step(&mut s, events).await {
                Ok(Some(end)) => return end,
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "connection to hub failed");
                    return s.lost();
                }
            }
            let timer = self.session_timer(&s);
            let registered = s.registered;
            let wake = tokio::select! {
                frame = s.ws.next() => Wake::Frame(frame),
                Some(ev) = events.recv() => Wake::Event(ev),
                _ = tick(&mut s.heartbeat) => Wake::Heartbeat,
                _ = shutdown.fired() => Wake::Shutdown,
                _ = tokio::time::sleep_until(timer) => Wake::Timer,
                req = next_llm(&mut self.llm.requests), if registered => Wake::Llm(req),
                _ = models_changed(&mut self.llm.models), if registered => Wake::ModelsChanged,
            };
            let step = match wake {
                Wake::Frame(None) => {
                    info!("hub closed the connection");
                    Ok(Some(s.lost()))
                }
                Wake::Frame(Some(Err(e))) => {
                    warn!(error = %e, "connection to hub failed");
                    Ok(Some(s.lost()))
                }
                Wake::Frame(Some(Ok(message))) => self.on_frame(&mut s, message).await,
                Wake::Event(ev) => self.on_event(&mut s, ev).await.map(|()| None),
                Wake::Heartbeat => {
                    let hb = self.heartbeat_message();
                    s.send(hb).await.map(|()| None)
                }
                Wake::Shutdown => {
                    self.begin_drain();
                    if s.registered {
                        let drain = NodeDrain {
                            node_id: self.node_id.clone(),
                        };
                        s.send(drain.into()).await.map(|()| None)
                    } else {
                        Ok(None)
                    }
                }
                Wake::Llm(mut req) => {
                    let pending = self
                        .llm
                        .client
                        .as_ref()
                        .is_some_and(|c| c.is_pending(&req.request_id));
                    if pending {
                        req.node_id = self.node_id.clone();
                        s.send(req.into()).await.map(|()| None)
                    } else {
                        Ok(None)
                    }
                }
                Wake::ModelsChanged => {
                    info!("hosted models changed; registering again");
                    let register = self.register_message(self.executor.running_ids());
                    s.send(register).await.map(|()| None)
                }
                Wake::Timer => {
                    if !s.registered && Instant::now() >= s.register_deadline {
                        warn!("hub did not answer node_register in time");
                        Ok(Some(s.lost()))
                    } else {
                        Ok(None)
                    }
                }
            };
            match step {
                Ok(Some(end)) => return end,
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "connection to hub failed");
                    return s.lost();
                }
            }
        }
    }

    fn session_timer<S>(&self, s: &Session<S>) -> Instant {
        let mut t = self.drain_timer();
        if !s.registered {
            t = t.min(s.register_deadline);
        }
        if let Some(u) = s.unregister_deadline {
            t = t.min(u);
        }
        t
    }

    /// Advances the drain while connected: aborts at the deadline, then unregisters once
    /// every result is delivered, then closes with 1000.
    async fn drain_step<S>(
        &mut self,
        s: &mut Session<S>,
        events: &mpsc::UnboundedReceiver<Event>,
    ) -> Result<Option<SessionEnd>, tungstenite::Error>
    where
        S: Stream<Item = Result<Message, tungstenite::Error>>
            + Sink<Message, Error = tungstenite::Error>
            + Unpin,
    {
        self.drain_abort_if_due();
        let Some(d) = self.drain else {
            return Ok(None);
        };
        if !s.registered {
            return Ok(None);
        }
        let now = Instant::now();
        match s.unregister_deadline {
            None => {
                let idle = self.executor.is_idle() && events.is_empty();
                if idle {
                    self.drain_idle();
                }
                let give_up_at = self.drain.map_or(d.give_up_at, |d| d.give_up_at);
                if idle && (self.outbox.is_empty() || now >= give_up_at) {
                    if !self.outbox.is_empty() {
                        warn!(
                            results = self.outbox.len(),
                            "hub did not acknowledge every result before the drain ended"
                        );
                    }
                    let bye = NodeUnregister {
                        node_id: self.node_id.clone(),
                        reason: Some("shutdown".into()),
                    };
                    s.send(bye.into()).await?;
                    s.unregister_deadline = Some(now + UNREGISTER_TIMEOUT);
                }
                Ok(None)
            }
            Some(deadline) if s.unregistered || now >= deadline => {
                let close = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "node shutting down".into(),
                };
                // The hub may already be gone; closing is best effort.
                if s.ws.send(Message::Close(Some(close))).await.is_ok() {
                    let _ = tokio::time::timeout(UNREGISTER_TIMEOUT, async {
                        while let Some(Ok(_)) = s.ws.next().await {}
                    })
                    .await;
                }
                info!("unregistered from hub; stopping");
                Ok(Some(SessionEnd::Finished))
            }
            Some(_) => Ok(None),
        }
    }

    async fn on_event<S>(&mut self, s: &mut Session<S>, ev: Event) -> Result<(), tungstenite::Error>
    where
        S: Sink<Message, Error = tungstenite::Error> + Unpin,
    {
        match ev {
            Event::Result(r) => {
                self.outbox.push(r);
                if s.registered {
                    self.flush_outbox(s).await?;
                }
            }
            Event::Progress(mut p) => {
                if s.registered {
                    p.node_id = Some(self.node_id.clone());
                    s.send(p.into()).await?;
                }
            }
            Event::Stream(mut c) => {
                if s.registered {
                    c.node_id = Some(self.node_id.clone());
                    s.send(c.into()).await?;
                }
            }
        }
        Ok(())
    }

    async fn flush_outbox<S>(&mut self, s: &mut Session<S>) -> Result<(), tungstenite::Error>
    where
        S: Sink<Message, Error = tungstenite::Error> + Unpin,
    {
        for mut r in self.outbox.take_unsent() {
            r.node_id = Some(self.node_id.clone());
            s.send(r.into()).await?;
        }
        Ok(())
    }

    async fn on_frame<S>(
        &mut self,
        s: &mut Session<S>,
        message: Message,
    ) -> Result<Option<SessionEnd>, tungstenite::Error>
    where
        S: Sink<Message, Error = tungstenite::Error> + Unpin,
    {
        let decoded = match &message {
            Message::Text(t) => codec::decode_text::<HubMessage>(t.as_str()),
            Message::Binary(b) => codec::decode_binary::<HubMessage>(b),
            Message::Close(frame) => {
                info!(
                    code = frame.as_ref().map(|f| u16::from(f.code)),
                    reason = frame.as_ref().map(|f| f.reason.as_str()),
                    "hub closed the connection"
                );
                return Ok(Some(s.lost()));
            }
            // Pings are answered by tungstenite itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(None),
        };
        match decoded {
            Ok(msg) => self.on_message(s, msg).await,
            Err(e) => {
                warn!(error = %e, "ignoring a frame from the hub that does not decode");
                Ok(None)
            }
        }
    }

    async fn on_message<S>(
        &mut self,
        s: &mut Session<S>,
        msg: HubMessage,
    ) -> Result<Option<SessionEnd>, tungstenite::Error>
    where
        S: Sink<Message, Error = tungstenite::Error> + Unpin,
    {
        match msg {
            HubMessage::ConnectionAck(a) => {
                debug!(server_id = %a.server_id, client_id = %a.client_id, "connection acknowledged");
            }
            HubMessage::NodeRegistered(r) => {
                if !r.success {
                    error!(message = %r.message, "hub refused the registration");
                    return Ok(Some(s.lost()));
                }
                self.adopt_id(&r.node_id);
                let info = r.hub_info.unwrap_or_default();
                s.encoding = if self.config.msgpack && info.encoding == Encoding::Msgpack {
                    Encoding::Msgpack
                } else {
                    if self.config.msgpack {
                        warn!("hub did not confirm msgpack; staying with json");
                    }
                    Encoding::Json
                };
                let period = match info.heartbeat_interval_ms {
                    0 => DEFAULT_HEARTBEAT,
                    ms => Duration::from_millis(ms).max(MIN_HEARTBEAT),
                };
                let mut interval = tokio::time::interval_at(Instant::now() + period, period);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                s.heartbeat = Some(interval);
                s.registered = true;
                s.registered_once = true;
                info!(
                    node_id = %self.node_id,
                    hub_version = %info.version,
                    encoding = ?s.encoding,
                    heartbeat_ms = period.as_millis() as u64,
                    pending_results = self.outbox.len(),
                    "registered with hub"
                );
                let hb = self.heartbeat_message();
                s.send(hb).await?;
                self.flush_outbox(s).await?;
                if self.drain.is_some() {
                    let drain = NodeDrain {
                        node_id: self.node_id.clone(),
                    };
                    s.send(drain.into()).await?;
                }
            }
            HubMessage::HeartbeatAck(a) => {
                if !a.success && s.registered {
                    warn!("hub does not know this node; registering again");
                    s.registered = false;
                    s.heartbeat = None;
                    s.register_deadline = Instant::now() + REGISTER_TIMEOUT;
                    self.outbox.mark_all_unsent();
                    let register = self.register_message(self.executor.running_ids());
                    s.send(register).await?;
                }
            }
            HubMessage::NodeUnregistered(_) => {
                s.unregistered = true;
            }
            HubMessage::TaskAssign(t) => {
                if !t.node_id.is_empty() && t.node_id != self.node_id {
                    warn!(task_id = %t.task_id, node_id = %t.node_id, "task_assign names another node id; running it anyway");
                }
                self.executor.assign(t);
            }
            HubMessage::TaskCancel(c) => {
                if !self.executor.cancel(&c.task_id, c.attempt, &c.reason) {
                    debug!(task_id = %c.task_id, "task_cancel for a task not running here");
                }
            }
            HubMessage::TaskResultAck(a) => {
                if !a.success {
                    debug!(task_id = %a.task_id, message = ?a.message, "hub did not commit a result");
                }
                self.outbox.ack(&a.task_id);
            }
            HubMessage::Error(e) => {
                warn!(code = %e.code, message = %e.message, "hub reported an error");
            }
            HubMessage::LlmResponseStream(f) => match &self.llm.client {
                Some(c) => c.on_stream(f),
                None => debug!("llm_response_stream without an llm client"),
            },
            HubMessage::LlmResponse(f) => match &self.llm.client {
                Some(c) => c.on_response(f),
                None => debug!("llm_response without an llm client"),
            },
            other => {
                debug!(
                    kind = other.type_name(),
                    "ignoring a frame not meant for worker nodes"
                );
            }
        }
        Ok(None)
    }

    fn adopt_id(&mut self, id: &str) {
        if id == self.node_id {
            return;
        }
        if !identity::is_valid(id) {
            warn!(node_id = %id, "hub assigned an unusable node id; keeping ours");
            return;
        }
        info!(old = %self.node_id, new = %id, "adopting the node id assigned by the hub");
        self.node_id = id.to_owned();
        if let Err(e) = identity::store(&self.config.data_dir, id) {
            warn!(error = %e, "cannot save the new node id");
        }
    }
}

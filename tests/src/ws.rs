//! A raw node-channel client for protocol tests: connects with any path and headers, sends
//! typed `apex_protocol` messages or raw frames, and receives with timeouts.
//!
//! A background task owns the socket and keeps reading, so the client answers the hub's
//! pings (tungstenite replies to pings by itself while it reads) even while the test is busy
//! elsewhere; received frames queue up until the test asks for them.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use apex_protocol::codec::{self, Frame};
use apex_protocol::{Encoding, HubMessage, NodeMessage, NodeRegister, NodeRegistered};
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::process::Hub;

/// Default wait for one frame.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// Something the hub sent (or did) on the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A frame that decodes as a hub message.
    Message {
        /// The message.
        msg: HubMessage,
        /// Whether it came as a binary (MessagePack) frame.
        binary: bool,
    },
    /// A text or binary frame that does not decode as a hub message.
    Undecodable {
        /// The frame as text (binary frames lossily).
        raw: String,
        /// Why it did not decode.
        error: String,
    },
    /// The connection closed; `code` is the close code if the hub sent a close frame.
    Closed {
        /// Close code.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
}

/// A raw client on the node channel.
#[derive(Debug)]
pub struct RawNode {
    out: mpsc::UnboundedSender<Message>,
    silent: watch::Sender<bool>,
    inbox: mpsc::UnboundedReceiver<Received>,
    io: JoinHandle<()>,
    encoding: Encoding,
    /// The node id the hub confirmed in `node_registered`, once registered.
    pub node_id: Option<String>,
    /// Frames skipped by [`RawNode::expect`] while looking for another one.
    pub skipped: Vec<Received>,
}

impl RawNode {
    /// Connects to `url` with extra request `headers`.
    ///
    /// # Errors
    /// If the upgrade is refused (the error names the HTTP status) or the connection fails.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Self> {
        let mut req = url.into_client_request()?;
        for (k, v) in headers {
            req.headers_mut()
                .insert(HeaderName::try_from(*k)?, HeaderValue::try_from(*v)?);
        }
        // No size limits on the client side: tests send and receive oversized frames on purpose.
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let (ws, _resp) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(resp) => {
                    anyhow!("upgrade of {url} refused with HTTP {}", resp.status())
                }
                other => anyhow!("connecting to {url}: {other}"),
            })?;
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (in_tx, inbox) = mpsc::unbounded_channel();
        let (silent, mut silent_rx) = watch::channel(false);
        let io = tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            loop {
                tokio::select! {
                    Ok(()) = silent_rx.changed() => {
                        if *silent_rx.borrow() {
                            // Keep the socket open but never touch it again (no pongs, no
                            // frames) until the client is dropped.
                            while out_rx.recv().await.is_some() {}
                            break;
                        }
                    }
                    incoming = stream.next() => {
                        let item = match incoming {
                            Some(Ok(Message::Text(t))) => decode(Frame::Text(t.to_string())),
                            Some(Ok(Message::Binary(b))) => decode(Frame::Binary(b.to_vec())),
                            Some(Ok(Message::Close(frame))) => Received::Closed {
                                code: frame.as_ref().map(|f| u16::from(f.code)),
                                reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                            },
                            Some(Ok(_)) => continue,
                            Some(Err(e)) => Received::Closed { code: None, reason: e.to_string() },
                            None => Received::Closed { code: None, reason: "stream ended".into() },
                        };
                        let closed = matches!(item, Received::Closed { .. });
                        if in_tx.send(item).is_err() || closed {
                            break;
                        }
                    }
                    outgoing = out_rx.recv() => {
                        match outgoing {
                            Some(m) => {
                                if sink.send(m).await.is_err() {
                                    let _ = in_tx.send(Received::Closed {
                                        code: None,
                                        reason: "send failed".into(),
                                    });
                                    break;
                                }
                            }
                            None => {
                                let _ = sink.close().await;
                                break;
                            }
                        }
                    }
                }
            }
        });
        Ok(Self {
            out: out_tx,
            silent,
            inbox,
            io,
            encoding: Encoding::Json,
            node_id: None,
            skipped: Vec::new(),
        })
    }

    /// Connects on the native path and registers as node `id` (also its name) offering `tools`
    /// with concurrency `limit`.
    ///
    /// # Errors
    /// If the connection fails or the hub answers `node_registered` with `success: false`.
    pub async fn connect_registered(
        hub: &Hub,
        id: &str,
        tools: &[&str],
        limit: u32,
    ) -> Result<Self> {
        let mut node = Self::connect_native(hub).await?;
        let ack = node
            .register(register_msg(Some(id), id, tools, limit))
            .await?;
        if !ack.success {
            bail!("the hub refused node {id}: {}", ack.message);
        }
        Ok(node)
    }

    /// Connects to `hub` on `/abp-distributed-server/VCP_Key=<node key>` (the native path the
    /// apex agent uses).
    ///
    /// # Errors
    /// See [`RawNode::connect`].
    pub async fn connect_native(hub: &Hub) -> Result<Self> {
        Self::connect(&hub.node_url("abp-distributed-server"), &[]).await
    }

    /// Connects to `hub` on `/vcp-distributed-server/VCP_Key=<node key>` (the VCP path).
    ///
    /// # Errors
    /// See [`RawNode::connect`].
    pub async fn connect_vcp(hub: &Hub) -> Result<Self> {
        Self::connect(&hub.node_url("vcp-distributed-server"), &[]).await
    }

    /// Tries an upgrade on `url` and returns the HTTP status: 101 when accepted (the
    /// connection is then closed), else the refusal status.
    ///
    /// # Errors
    /// On a transport error other than a refused upgrade.
    pub async fn upgrade_status(url: &str, headers: &[(&str, &str)]) -> Result<u16> {
        let mut req = url.into_client_request()?;
        for (k, v) in headers {
            req.headers_mut()
                .insert(HeaderName::try_from(*k)?, HeaderValue::try_from(*v)?);
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((mut ws, resp)) => {
                let _ = ws.close(None).await;
                Ok(resp.status().as_u16())
            }
            Err(tungstenite::Error::Http(resp)) => Ok(resp.status().as_u16()),
            Err(e) => Err(e).with_context(|| format!("connecting to {url}")),
        }
    }

    /// Sets the encoding of later [`RawNode::send`] calls.
    pub fn set_encoding(&mut self, encoding: Encoding) {
        self.encoding = encoding;
    }

    /// Sends a message in the current encoding.
    ///
    /// # Errors
    /// If the connection task has ended.
    pub fn send(&self, msg: impl Into<NodeMessage>) -> Result<()> {
        let msg: NodeMessage = msg.into();
        match codec::encode(&msg, self.encoding)? {
            Frame::Text(t) => self.send_raw(Message::text(t)),
            Frame::Binary(b) => self.send_raw(Message::binary(b)),
        }
    }

    /// Sends a raw text frame.
    ///
    /// # Errors
    /// If the connection task has ended.
    pub fn send_text(&self, text: impl Into<String>) -> Result<()> {
        self.send_raw(Message::text(text.into()))
    }

    /// Sends a JSON value as a text frame.
    ///
    /// # Errors
    /// If the connection task has ended.
    pub fn send_json(&self, v: &serde_json::Value) -> Result<()> {
        self.send_text(v.to_string())
    }

    /// Sends a raw binary frame.
    ///
    /// # Errors
    /// If the connection task has ended.
    pub fn send_binary(&self, bytes: Vec<u8>) -> Result<()> {
        self.send_raw(Message::binary(bytes))
    }

    /// Sends any WebSocket message.
    ///
    /// # Errors
    /// If the connection task has ended.
    pub fn send_raw(&self, m: Message) -> Result<()> {
        self.out
            .send(m)
            .map_err(|_| anyhow!("raw node connection is closed"))
    }

    /// The next thing received, waiting up to `timeout`.
    ///
    /// # Errors
    /// On timeout, or when called again after the connection closed.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Received> {
        match tokio::time::timeout(timeout, self.inbox.recv()).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => bail!("raw node connection already closed"),
            Err(_) => bail!("nothing received from the hub within {timeout:?}"),
        }
    }

    /// The next thing received, waiting up to [`RECV_TIMEOUT`].
    ///
    /// # Errors
    /// See [`RawNode::recv_timeout`].
    pub async fn recv(&mut self) -> Result<Received> {
        self.recv_timeout(RECV_TIMEOUT).await
    }

    /// Waits for the first message `pick` accepts, skipping (and keeping in
    /// [`RawNode::skipped`]) every other frame.
    ///
    /// # Errors
    /// On timeout, or if the connection closes first.
    pub async fn expect_within<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(&HubMessage) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let got = self
                .recv_timeout(left)
                .await
                .with_context(|| format!("waiting for {what}; skipped: {:?}", self.skipped))?;
            match &got {
                Received::Message { msg, .. } => {
                    if let Some(v) = pick(msg) {
                        return Ok(v);
                    }
                }
                Received::Closed { code, reason } => {
                    bail!("connection closed ({code:?} {reason}) while waiting for {what}")
                }
                Received::Undecodable { .. } => {}
            }
            self.skipped.push(got);
        }
    }

    /// [`RawNode::expect_within`] with [`RECV_TIMEOUT`].
    ///
    /// # Errors
    /// See [`RawNode::expect_within`].
    pub async fn expect<T>(
        &mut self,
        what: &str,
        pick: impl FnMut(&HubMessage) -> Option<T>,
    ) -> Result<T> {
        self.expect_within(what, RECV_TIMEOUT, pick).await
    }

    /// Sends `node_register` and waits for `node_registered`; records the confirmed node id and,
    /// when the hub confirms MessagePack, switches the encoding.
    ///
    /// # Errors
    /// If no `node_registered` arrives.
    pub async fn register(&mut self, reg: NodeRegister) -> Result<NodeRegistered> {
        self.send(reg)?;
        let ack = self
            .expect("node_registered", |m| match m {
                HubMessage::NodeRegistered(r) => Some(r.clone()),
                _ => None,
            })
            .await?;
        if ack.success {
            self.node_id = Some(ack.node_id.clone());
            if let Some(info) = &ack.hub_info {
                self.encoding = info.encoding;
            }
        }
        Ok(ack)
    }

    /// Waits until the hub closes the connection and returns its close code.
    ///
    /// # Errors
    /// If the connection stays open for `timeout`.
    pub async fn expect_closed(&mut self, timeout: Duration) -> Result<Option<u16>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_timeout(left).await? {
                Received::Closed { code, .. } => return Ok(code),
                other => self.skipped.push(other),
            }
        }
    }

    /// Closes the connection with a normal close handshake (dropping the client does too).
    pub fn close(self) {
        // Dropping the sender makes the I/O task send a close frame and end.
    }

    /// Stops reading and writing the socket while keeping it open, as a node behind a dead
    /// network path looks to the hub: pings go unanswered and nothing more is received or
    /// sent, so the hub declares the connection silent after its heartbeat timeout.
    pub fn go_silent(&self) {
        let _ = self.silent.send(true);
    }

    /// Drops the connection without a close frame, as a crashed node would.
    pub fn abort(self) {
        self.io.abort();
    }
}

fn decode(frame: Frame) -> Received {
    let binary = matches!(frame, Frame::Binary(_));
    match codec::decode::<HubMessage>(&frame) {
        Ok(msg) => Received::Message { msg, binary },
        Err(e) => Received::Undecodable {
            raw: match frame {
                Frame::Text(t) => t,
                Frame::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
            },
            error: e.to_string(),
        },
    }
}

/// A native `node_register` for a raw test node offering `tools` (bare names).
pub fn register_msg(
    node_id: Option<&str>,
    name: &str,
    tools: &[&str],
    max_concurrent: u32,
) -> NodeRegister {
    NodeRegister {
        node_id: node_id.map(str::to_owned),
        name: name.to_owned(),
        tools: tools
            .iter()
            .map(|t| apex_protocol::ToolSpec::Name((*t).to_owned()))
            .collect(),
        max_concurrent_tasks: Some(max_concurrent),
        ..NodeRegister::default()
    }
}

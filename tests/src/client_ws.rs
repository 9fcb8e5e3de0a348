//! A client of the hub's client WebSocket (`GET /ws`): connects with a bearer header or
//! `?token=`, sends JSON frames and receives them with timeouts.
//!
//! A background task owns the socket and keeps reading (so pings are answered and frames
//! queue up until the test asks for them), except for [`ClientWs::connect_stalled`], whose
//! socket nobody reads: a client that stopped reading, for the hub's slow-client shedding.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

/// Default wait for one frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// What the hub sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A JSON text frame.
    Json(Value),
    /// The connection ended; `code` is the close code when the hub sent a close frame.
    Closed {
        /// Close code.
        code: Option<u16>,
        /// Close reason, or what ended the stream.
        reason: String,
    },
}

/// A connected `/ws` client.
#[derive(Debug)]
pub struct ClientWs {
    out: mpsc::UnboundedSender<Message>,
    inbox: mpsc::UnboundedReceiver<Frame>,
    io: JoinHandle<()>,
}

impl Drop for ClientWs {
    fn drop(&mut self) {
        self.io.abort();
    }
}

/// `ws://…/ws` of the hub at `http_base` (`http://127.0.0.1:port`).
pub fn ws_url(http_base: &str) -> String {
    format!("{}/ws", http_base.replacen("http", "ws", 1))
}

fn request(
    http_base: &str,
    token: &str,
    in_query: bool,
) -> Result<tungstenite::handshake::client::Request> {
    let url = if in_query {
        format!("{}?token={token}", ws_url(http_base))
    } else {
        ws_url(http_base)
    };
    let mut req = url.into_client_request()?;
    if !in_query {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::try_from(format!("Bearer {token}"))?,
        );
    }
    Ok(req)
}

impl ClientWs {
    /// Connects to the hub at `http_base` with `Authorization: Bearer <token>`.
    ///
    /// # Errors
    /// If the upgrade is refused (the error names the HTTP status) or the connection fails.
    pub async fn connect(http_base: &str, token: &str) -> Result<Self> {
        Self::open(request(http_base, token, false)?).await
    }

    /// Connects with the credential in the query (`/ws?token=<token>`), as browsers do.
    ///
    /// # Errors
    /// As [`ClientWs::connect`].
    pub async fn connect_query(http_base: &str, token: &str) -> Result<Self> {
        Self::open(request(http_base, token, true)?).await
    }

    /// The HTTP status of an upgrade with `?token=<token>` (`in_query`) or a bearer header:
    /// 101 when accepted (the connection is then closed), else the refusal's status and body.
    ///
    /// # Errors
    /// On a transport error other than a refused upgrade.
    pub async fn upgrade_status(
        http_base: &str,
        token: &str,
        in_query: bool,
    ) -> Result<(u16, Value)> {
        match tokio_tungstenite::connect_async(request(http_base, token, in_query)?).await {
            Ok((mut ws, resp)) => {
                let _ = ws.close(None).await;
                Ok((resp.status().as_u16(), Value::Null))
            }
            Err(tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Ok((status, body))
            }
            Err(e) => Err(e).context("connecting to /ws"),
        }
    }

    /// Connects with a bearer header over a socket with a tiny receive buffer that nobody
    /// reads: after `first` is sent, the client never reads again, so the hub's writes to it
    /// soon block. Returns the socket's owner; drop it to close.
    ///
    /// # Errors
    /// If the connection or the upgrade fails.
    pub async fn connect_stalled(
        http_base: &str,
        token: &str,
        first: &Value,
    ) -> Result<JoinHandle<()>> {
        let req = request(http_base, token, false)?;
        let addr: std::net::SocketAddr = http_base
            .trim_start_matches("http://")
            .parse()
            .context("the hub's address")?;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let tcp = socket.connect(addr).await?;
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp)
            .await
            .map_err(|e| anyhow!("upgrade refused: {e}"))?;
        ws.send(Message::text(first.to_string())).await?;
        Ok(tokio::spawn(async move {
            // Holds the socket open without reading it until aborted.
            let _ws = ws;
            std::future::pending::<()>().await;
        }))
    }

    async fn open(req: tungstenite::handshake::client::Request) -> Result<Self> {
        let (ws, _resp) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(resp) => {
                    anyhow!("upgrade of /ws refused with HTTP {}", resp.status())
                }
                other => anyhow!("connecting to /ws: {other}"),
            })?;
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (in_tx, inbox) = mpsc::unbounded_channel();
        let io = tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            loop {
                tokio::select! {
                    incoming = stream.next() => {
                        let item = match incoming {
                            Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()) {
                                Ok(v) => Frame::Json(v),
                                Err(e) => Frame::Closed {
                                    code: None,
                                    reason: format!("the hub sent a frame that is not JSON ({e}): {t}"),
                                },
                            },
                            Some(Ok(Message::Close(f))) => Frame::Closed {
                                code: f.as_ref().map(|f| u16::from(f.code)),
                                reason: f.map(|f| f.reason.to_string()).unwrap_or_default(),
                            },
                            Some(Ok(_)) => continue,
                            Some(Err(e)) => Frame::Closed { code: None, reason: e.to_string() },
                            None => Frame::Closed { code: None, reason: "stream ended".into() },
                        };
                        let closed = matches!(item, Frame::Closed { .. });
                        if in_tx.send(item).is_err() || closed {
                            break;
                        }
                    }
                    outgoing = out_rx.recv() => match outgoing {
                        Some(m) => {
                            if sink.send(m).await.is_err() {
                                break;
                            }
                        }
                        None => {
                            let _ = sink.close().await;
                            break;
                        }
                    },
                }
            }
        });
        Ok(Self { out, inbox, io })
    }

    /// Sends `v` as a text frame.
    ///
    /// # Errors
    /// If the connection has ended.
    pub fn send(&self, v: &Value) -> Result<()> {
        self.out
            .send(Message::text(v.to_string()))
            .map_err(|_| anyhow!("the /ws connection is closed"))
    }

    /// The next frame, waiting up to `timeout`.
    ///
    /// # Errors
    /// On timeout.
    pub async fn next(&mut self, timeout: Duration) -> Result<Frame> {
        match tokio::time::timeout(timeout, self.inbox.recv()).await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Ok(Frame::Closed {
                code: None,
                reason: "connection task ended".into(),
            }),
            Err(_) => bail!("no frame from /ws within {timeout:?}"),
        }
    }

    /// The next JSON frame (within [`FRAME_TIMEOUT`]).
    ///
    /// # Errors
    /// On timeout or when the connection closes first.
    pub async fn next_json(&mut self) -> Result<Value> {
        match self.next(FRAME_TIMEOUT).await? {
            Frame::Json(v) => Ok(v),
            Frame::Closed { code, reason } => {
                bail!("/ws closed ({code:?}: {reason}) while a frame was expected")
            }
        }
    }

    /// Frames up to and including the first of `kind` (within [`FRAME_TIMEOUT`] each).
    ///
    /// # Errors
    /// On timeout or when the connection closes first.
    pub async fn until(&mut self, kind: &str) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        loop {
            let v = self.next_json().await?;
            let done = v["type"] == kind;
            out.push(v);
            if done {
                return Ok(out);
            }
        }
    }

    /// Every frame that arrives within `window` (for "nothing else came" checks).
    ///
    /// # Errors
    /// When the connection closes meanwhile.
    pub async fn drain_for(&mut self, window: Duration) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(out);
            }
            match self.next(left).await {
                Ok(Frame::Json(v)) => out.push(v),
                Ok(Frame::Closed { code, reason }) => bail!("/ws closed ({code:?}: {reason})"),
                Err(_) => return Ok(out),
            }
        }
    }

    /// Sends `ping` and waits for the `pong` (frames before it are returned).
    ///
    /// # Errors
    /// On timeout or a closed connection.
    pub async fn ping(&mut self) -> Result<Vec<Value>> {
        self.send(&serde_json::json!({"type": "ping"}))?;
        self.until("pong").await
    }
}

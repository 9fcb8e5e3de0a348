//! Shared mode's pub/sub: wake-ups ([`subscribe`]: queue keys on `apex:shared:wake`, task ids
//! whose record changed on `apex:shared:task-events`) and cancel requests ([`CANCEL_CHANNEL`]).
//! Each subscription has a connection of its own; its stream ends when that connection drops
//! (subscribe again). The messages only say when to look: queues and records are the truth.

use apex_protocol::ErrorInfo;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::model::Outcome;

use super::{
    CANCEL_CHANNEL, EVENTS_CHANNEL, Error, NOTIFY_CHANNEL, SharedRedis, WAKE_CHANNEL, one_line,
};

/// A wake-up published by some hub (see the module docs for the channels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// A task was added to this queue key ([`tool_queue`](super::tool_queue) or
    /// [`pinned_queue`](super::pinned_queue)).
    Queue(String),
    /// This task's record changed (read it with [`SharedRedis::get`]).
    Task(String),
}

/// Subscribes to [`WAKE_CHANNEL`] and [`EVENTS_CHANNEL`] on a connection of its own. The stream
/// ends when that connection drops: messages published meanwhile are lost, so a subscriber
/// subscribes again and re-reads what it follows (queues and task records are the truth; the
/// messages only say when to look).
///
/// # Errors
/// [`Error::Unavailable`] if Redis cannot be reached.
pub async fn subscribe(url: &str) -> Result<impl Stream<Item = Wake> + Send + 'static, Error> {
    let what = crate::durable::redis::redacted(url);
    let unavailable = |e: redis::RedisError| Error::Unavailable {
        what: what.clone(),
        reason: one_line(e),
    };
    let client = redis::Client::open(url).map_err(unavailable)?;
    let mut pubsub = client.get_async_pubsub().await.map_err(unavailable)?;
    pubsub
        .subscribe(&[WAKE_CHANNEL, EVENTS_CHANNEL])
        .await
        .map_err(unavailable)?;
    Ok(pubsub.into_on_message().filter_map(|msg| async move {
        let payload = String::from_utf8(msg.get_payload_bytes().to_vec()).ok()?;
        match msg.get_channel_name() {
            WAKE_CHANNEL => Some(Wake::Queue(payload)),
            EVENTS_CHANNEL => Some(Wake::Task(payload)),
            _ => None,
        }
    }))
}

/// A request to end a task another hub holds, on [`CANCEL_CHANNEL`]: a bare task id is a
/// user's cancel (what every hub version sends); a JSON object
/// `{"id", "status": "succeeded"|"failed", "result"?, "error"?}` ends it with that outcome
/// (an asynchronous plugin's callback that reached another hub).
#[derive(Debug, Clone, PartialEq)]
pub struct EndRequest {
    /// The task.
    pub id: String,
    /// `None`: cancel.
    pub outcome: Option<Outcome>,
}

#[derive(Serialize, Deserialize)]
struct EndWire {
    id: String,
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorInfo>,
}

impl EndRequest {
    fn encode(id: &str, outcome: Option<&Outcome>) -> Vec<u8> {
        let wire = match outcome {
            None => return id.as_bytes().to_vec(),
            Some(Outcome::Succeeded(v)) => EndWire {
                id: id.to_owned(),
                status: "succeeded".into(),
                result: Some(v.clone()),
                error: None,
            },
            Some(o @ (Outcome::Failed(e) | Outcome::Cancelled(e) | Outcome::TimedOut(e))) => {
                EndWire {
                    id: id.to_owned(),
                    status: o.status().as_str().into(),
                    result: None,
                    error: Some(e.clone()),
                }
            }
        };
        serde_json::to_vec(&wire).unwrap_or_else(|_| id.as_bytes().to_vec())
    }

    fn decode(payload: &[u8]) -> Option<Self> {
        if payload.first() != Some(&b'{') {
            let id = String::from_utf8(payload.to_vec()).ok()?;
            return Some(Self { id, outcome: None });
        }
        let w: EndWire = serde_json::from_slice(payload).ok()?;
        let error = || {
            w.error
                .clone()
                .unwrap_or_else(|| ErrorInfo::new("task_execution_failed", "the task failed"))
        };
        let outcome = match w.status.as_str() {
            "succeeded" => Outcome::Succeeded(w.result.clone().unwrap_or_default()),
            "cancelled" => Outcome::Cancelled(error()),
            "timed_out" => Outcome::TimedOut(error()),
            _ => Outcome::Failed(error()),
        };
        Some(Self {
            id: w.id,
            outcome: Some(outcome),
        })
    }
}

/// Subscribes to [`CANCEL_CHANNEL`] on a connection of its own; the stream yields the
/// [`EndRequest`]s and ends when the connection drops (subscribe again).
///
/// # Errors
/// [`Error::Unavailable`] if Redis cannot be reached.
pub async fn subscribe_cancels(
    url: &str,
) -> Result<impl Stream<Item = EndRequest> + Send + 'static, Error> {
    Ok(subscribe_channel(url, CANCEL_CHANNEL)
        .await?
        .filter_map(|payload| async move { EndRequest::decode(&payload) }))
}

/// Subscribes to [`NOTIFY_CHANNEL`] on a connection of its own; the stream yields each
/// payload (a `crate::notify` envelope) and ends when the connection drops (subscribe again;
/// notifications published meanwhile are lost).
///
/// # Errors
/// [`Error::Unavailable`] if Redis cannot be reached.
pub async fn subscribe_notifications(
    url: &str,
) -> Result<impl Stream<Item = Vec<u8>> + Send + 'static, Error> {
    subscribe_channel(url, NOTIFY_CHANNEL).await
}

/// The payloads published on `channel`, on a pub/sub connection of its own; the stream ends
/// when the connection drops.
///
/// # Errors
/// [`Error::Unavailable`] if Redis cannot be reached.
pub(super) async fn subscribe_channel(
    url: &str,
    channel: &'static str,
) -> Result<impl Stream<Item = Vec<u8>> + Send + 'static, Error> {
    let what = crate::durable::redis::redacted(url);
    let unavailable = |e: redis::RedisError| Error::Unavailable {
        what: what.clone(),
        reason: one_line(e),
    };
    let client = redis::Client::open(url).map_err(unavailable)?;
    let mut pubsub = client.get_async_pubsub().await.map_err(unavailable)?;
    pubsub.subscribe(channel).await.map_err(unavailable)?;
    Ok(pubsub
        .into_on_message()
        .map(|msg| msg.get_payload_bytes().to_vec()))
}

impl SharedRedis {
    /// Asks the hub holding task `id` to end it ([`CANCEL_CHANNEL`]): with `outcome`, or
    /// cancelled when it is `None`. Returns how many hubs heard the request.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn request_end(&self, id: &str, outcome: Option<&Outcome>) -> Result<u64, Error> {
        let mut c = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(CANCEL_CHANNEL)
            .arg(EndRequest::encode(id, outcome))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }
}

impl SharedRedis {
    /// Publishes a notification envelope on [`NOTIFY_CHANNEL`] for every hub to deliver to its
    /// connections. Returns how many hubs heard it.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn publish_notification(&self, payload: &[u8]) -> Result<u64, Error> {
        let mut c = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(NOTIFY_CHANNEL)
            .arg(payload)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn end_requests_round_trip_and_bare_ids_are_cancels() {
        let done = Outcome::Succeeded(serde_json::json!({"n": 1}));
        let r = EndRequest::decode(&EndRequest::encode("t1", Some(&done))).unwrap();
        assert_eq!(r.id, "t1");
        assert_eq!(r.outcome, Some(done));
        let failed = Outcome::Failed(ErrorInfo::new("plugin_failed", "no"));
        let r = EndRequest::decode(&EndRequest::encode("t2", Some(&failed))).unwrap();
        assert_eq!(r.outcome, Some(failed));
        let r = EndRequest::decode(b"t3").unwrap();
        assert_eq!((r.id.as_str(), r.outcome), ("t3", None));
        assert!(EndRequest::decode(b"{not json").is_none());
    }
}

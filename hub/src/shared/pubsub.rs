//! Shared mode's pub/sub: wake-ups ([`subscribe`]: queue keys on `apex:shared:wake`, task ids
//! whose record changed on `apex:shared:task-events`) and cancel requests ([`CANCEL_CHANNEL`]).
//! Each subscription has a connection of its own; its stream ends when that connection drops
//! (subscribe again). The messages only say when to look: queues and records are the truth.

use futures::{Stream, StreamExt};

use super::{CANCEL_CHANNEL, EVENTS_CHANNEL, Error, SharedRedis, WAKE_CHANNEL, one_line};

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

/// Subscribes to [`CANCEL_CHANNEL`] on a connection of its own; the stream yields task ids and
/// ends when the connection drops (subscribe again).
///
/// # Errors
/// [`Error::Unavailable`] if Redis cannot be reached.
pub async fn subscribe_cancels(
    url: &str,
) -> Result<impl Stream<Item = String> + Send + 'static, Error> {
    Ok(subscribe_channel(url, CANCEL_CHANNEL)
        .await?
        .filter_map(|payload| async move { String::from_utf8(payload).ok() }))
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
    /// Asks the hub holding task `id` to cancel it ([`CANCEL_CHANNEL`]). Returns how many hubs
    /// heard the request.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn request_cancel(&self, id: &str) -> Result<u64, Error> {
        let mut c = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(CANCEL_CHANNEL)
            .arg(id)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }
}

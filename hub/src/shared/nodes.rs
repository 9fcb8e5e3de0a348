//! The cluster-wide node registry and node views: [`SharedNode`] entries (`nodes`, written by
//! the store writer at each registration, read by the reapers' hand-over check), the
//! `GET /v1/nodes` objects each hub publishes (`node-views`) and merges with its own nodes
//! ([`all_node_views`], [`node_view`]), and drain/undrain requests forwarded to the hub holding
//! a node ([`NodeAction`] on [`NODE_ACTIONS_CHANNEL`]).

use std::collections::HashMap;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use super::pubsub::subscribe_channel;
use super::{Error, NODE_ACTIONS_CHANNEL, PREFIX, SharedRedis, lease_key, now_ms};
use crate::engine::Cluster;
use crate::store::NodeRecord;

/// A node in the cluster-wide registry: the node's record and the hub it is connected to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedNode {
    /// The node.
    pub node: NodeRecord,
    /// The hub id holding its connection.
    pub hub: String,
    /// When that hub last wrote this entry, milliseconds since the Unix epoch.
    pub seen_ms: u64,
}

/// An operator action on a node, forwarded to the hub holding its connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAction {
    /// The hub that should apply it.
    pub hub: String,
    /// The node.
    pub node: String,
    /// `true`: drain (no new work); `false`: undrain.
    pub drain: bool,
}

impl SharedRedis {
    /// Writes this hub's node into the cluster-wide registry.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn put_node(&self, node: &NodeRecord) -> Result<(), Error> {
        let entry = SharedNode {
            node: node.clone(),
            hub: self.hub_id.clone(),
            seen_ms: now_ms(),
        };
        let json = serde_json::to_vec(&entry).map_err(|e| self.unavailable(e))?;
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(format!("{PREFIX}nodes"))
            .arg(&node.id)
            .arg(json)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Every node of the cluster-wide registry (entries that do not decode are skipped with a
    /// warning: one bad entry must not hide the others).
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn nodes(&self) -> Result<Vec<SharedNode>, Error> {
        let mut c = self.conn.clone();
        let rows: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(format!("{PREFIX}nodes"))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, raw) in rows {
            match serde_json::from_slice(&raw) {
                Ok(n) => out.push(n),
                Err(e) => {
                    tracing::warn!(node_id = %id, error = %e, "shared node entry does not decode")
                }
            }
        }
        out.sort_by(|a: &SharedNode, b| a.node.id.cmp(&b.node.id));
        Ok(out)
    }

    /// Publishes this hub's node views (id, `GET /v1/nodes` object) in the hash
    /// `apex:shared:node-views` (node id → `{"hub", "seen_ms", "view"}`), so every hub lists
    /// every hub's nodes.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn put_node_views(&self, views: &[(String, serde_json::Value)]) -> Result<(), Error> {
        if views.is_empty() {
            return Ok(());
        }
        let seen_ms = now_ms();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(format!("{PREFIX}node-views"));
        for (id, view) in views {
            let entry = serde_json::json!({"hub": self.hub_id, "seen_ms": seen_ms, "view": view});
            cmd.arg(id).arg(entry.to_string());
        }
        let mut c = self.conn.clone();
        let _: i64 = cmd
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Node views published by other hubs, as (hub id, whether that hub's lease is alive,
    /// milliseconds since its last write, view). Entries that do not decode are skipped.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn other_node_views(
        &self,
    ) -> Result<Vec<(String, bool, u64, serde_json::Value)>, Error> {
        let mut c = self.conn.clone();
        let rows: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(format!("{PREFIX}node-views"))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let now = now_ms();
        let mut alive: HashMap<String, bool> = HashMap::new();
        let mut out = Vec::new();
        for (_, raw) in rows {
            let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
                continue;
            };
            let Some(hub) = v["hub"].as_str().map(str::to_owned) else {
                continue;
            };
            if hub == self.hub_id {
                continue;
            }
            let live = match alive.get(&hub) {
                Some(l) => *l,
                None => {
                    let l: bool = redis::cmd("EXISTS")
                        .arg(lease_key(&hub))
                        .query_async(&mut c)
                        .await
                        .map_err(|e| self.unavailable(e))?;
                    alive.insert(hub.clone(), l);
                    l
                }
            };
            let age = now.saturating_sub(v["seen_ms"].as_u64().unwrap_or(0));
            out.push((hub, live, age, v["view"].take()));
        }
        Ok(out)
    }

    /// Asks hub `hub` to drain (or undrain) its node `node` ([`NODE_ACTIONS_CHANNEL`]).
    /// Returns how many hubs heard the request.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn request_node_action(
        &self,
        hub: &str,
        node: &str,
        drain: bool,
    ) -> Result<u64, Error> {
        let action = NodeAction {
            hub: hub.to_owned(),
            node: node.to_owned(),
            drain,
        };
        let payload = serde_json::to_vec(&action).map_err(|e| self.unavailable(e))?;
        let mut c = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(NODE_ACTIONS_CHANNEL)
            .arg(payload)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }
}

/// Subscribes to [`NODE_ACTIONS_CHANNEL`] on a connection of its own; the stream yields the
/// actions that decode and ends when the connection drops (subscribe again).
///
/// # Errors
/// [`Error::Unavailable`] if Redis cannot be reached.
pub async fn subscribe_node_actions(
    url: &str,
) -> Result<impl Stream<Item = NodeAction> + Send + 'static, Error> {
    Ok(subscribe_channel(url, NODE_ACTIONS_CHANNEL)
        .await?
        .filter_map(|payload| async move { serde_json::from_slice(&payload).ok() }))
}

/// `GET /v1/nodes/{id}` in shared mode: the node's view as [`all_node_views`] lists it (this
/// hub's, or the one of the hub it is online at), `None` if no hub knows it.
///
/// # Errors
/// [`Error::Unavailable`].
pub async fn node_view(
    redis: &SharedRedis,
    cluster: &Cluster,
    id: &str,
) -> Result<Option<serde_json::Value>, Error> {
    Ok(all_node_views(redis, cluster)
        .await?
        .into_iter()
        .find(|v| v["id"] == id))
}

/// `GET /v1/nodes` in shared mode: this hub's nodes and the views other hubs published, one
/// per node id, each with a `hub` field naming the hub it is (or was) connected to. A node
/// online at some hub is listed as there; a view from a hub whose lease is gone, or not
/// refreshed for 5 s, is listed `offline`.
///
/// # Errors
/// [`Error::Unavailable`].
pub async fn all_node_views(
    redis: &SharedRedis,
    cluster: &Cluster,
) -> Result<Vec<serde_json::Value>, Error> {
    let mut by_id: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
    for (hub, alive, age_ms, mut view) in redis.other_node_views().await? {
        let Some(id) = view["id"].as_str().map(str::to_owned) else {
            continue;
        };
        if !alive || age_ms > 5_000 {
            view["status"] = "offline".into();
        }
        view["hub"] = hub.into();
        let online = view["status"] != "offline";
        if online || !by_id.contains_key(&id) {
            by_id.insert(id, view);
        }
    }
    for n in cluster.nodes() {
        let Ok(mut view) = serde_json::to_value(&n) else {
            continue;
        };
        view["hub"] = redis.hub_id().into();
        let here_online = n.status != crate::model::NodeState::Offline;
        let elsewhere_online = by_id.get(&n.id).is_some_and(|v| v["status"] != "offline");
        if here_online || !elsewhere_online {
            by_id.insert(n.id.clone(), view);
        }
    }
    Ok(by_id.into_values().collect())
}

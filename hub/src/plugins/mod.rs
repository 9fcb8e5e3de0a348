//! Plugins and tools across the cluster: the catalogue (`GET /api/v1/plugins`,
//! `/api/v1/tools`), the enable/disable switches every hub honours, and signed callbacks of
//! asynchronous plugins ([`callback`]).
//!
//! - Nodes declare plugins as tools whose `ToolDescription.plugin` carries the manifest's
//!   metadata (apex-node's `--plugin-dir`, the VCP `register_tools` manifests). The catalogue
//!   is built from the node views of the whole cluster (every hub's nodes in shared mode), so
//!   it needs no store of its own.
//! - A plugin switched off is a record `plugin_state/<name>` = `{"enabled": false, …}`; every
//!   hub keeps the set of disabled names in memory, reloaded when the kind's record version
//!   moves (polled every [`records::POLL`]). The task service refuses submissions of a
//!   disabled plugin's tool (409 `plugin_disabled`).
//! - A search tool is a plugin tool with the `search` capability ([`SEARCH_CAPABILITY`],
//!   listed by [`search_tools`]); the knowledge platform's `/api/v2/query` calls each with
//!   `{query, limit}` and reads `results[]` of `{title, source, snippet}`
//!   (`examples/plugins/doc_search` is one).

pub mod callback;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use apex_protocol::{PluginType, ToolDescription, ToolSpec};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use callback::CallbackSigner;

use crate::records::{self, Kind, RecordStore};
use crate::store;

/// The plugin capability that makes a tool a search tool ([`search_tools`]).
pub const SEARCH_CAPABILITY: &str = "search";

/// Record kind of the enable/disable switches: id = plugin name.
pub const PLUGIN_STATE: Kind = "plugin_state";
/// Record kind of generated secrets (shared with identity) and the callback secret's id.
const SECRET: Kind = crate::identity::SECRET;
const CALLBACK_SECRET_ID: &str = "plugin_callback_hmac";

/// A stored switch.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Switch {
    enabled: bool,
    /// Unix ms of the change.
    updated_at_ms: i64,
}

struct Inner {
    records: RecordStore,
    disabled: RwLock<HashSet<String>>,
    /// The record version the set was read at (`u64::MAX`: never).
    version: AtomicU64,
    signer: CallbackSigner,
}

/// The plugin switches and the callback signer; cheap to clone.
#[derive(Clone)]
pub struct Plugins {
    inner: Arc<Inner>,
}

impl Plugins {
    /// Opens the switches on `records` and the callback secret (generated once per cluster);
    /// callback URLs start with `public_url`.
    ///
    /// # Errors
    /// [`store::Error`] when the records cannot be read.
    pub async fn open(records: RecordStore, public_url: &str) -> Result<Self, store::Error> {
        let fresh = crate::identity::random_hex(32);
        let (secret, created) = records
            .generated_secret(SECRET, CALLBACK_SECRET_ID, fresh.as_bytes())
            .await?;
        if created {
            tracing::info!("plugin callback secret generated and stored");
        }
        let me = Self::with_secret(records, &secret, public_url);
        me.sync().await?;
        Ok(me)
    }

    /// Switches over `records` with a random callback secret that is not stored (tests).
    pub fn ephemeral(records: RecordStore, public_url: &str) -> Self {
        Self::with_secret(
            records,
            crate::identity::random_hex(32).as_bytes(),
            public_url,
        )
    }

    fn with_secret(records: RecordStore, secret: &[u8], public_url: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                records,
                disabled: RwLock::new(HashSet::new()),
                version: AtomicU64::new(u64::MAX),
                signer: CallbackSigner::new(secret, public_url),
            }),
        }
    }

    /// The signer of callback URLs.
    pub fn signer(&self) -> &CallbackSigner {
        &self.inner.signer
    }

    /// Whether tasks of tool `name` are refused because its plugin is switched off here.
    pub fn is_disabled(&self, name: &str) -> bool {
        let d = self.inner.disabled.read();
        !d.is_empty() && d.contains(name)
    }

    /// Switches plugin `name` on or off at every hub (stored; in force here at once and at
    /// the others within one poll).
    ///
    /// # Errors
    /// [`store::Error`]; nothing changes then.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), store::Error> {
        let value = serde_json::to_vec(&Switch {
            enabled,
            updated_at_ms: apex_protocol::now_ms(),
        })
        .unwrap_or_default();
        self.inner
            .records
            .put(PLUGIN_STATE, name, &value, None)
            .await?;
        let mut d = self.inner.disabled.write();
        if enabled {
            d.remove(name);
        } else {
            d.insert(name.to_owned());
        }
        Ok(())
    }

    /// Reloads the disabled set if the switches' record version moved.
    ///
    /// # Errors
    /// [`store::Error`] (the last copy stays in use).
    pub async fn sync(&self) -> Result<(), store::Error> {
        let records = &self.inner.records;
        let v = records.version(PLUGIN_STATE).await?;
        if v == self.inner.version.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut off = HashSet::new();
        for (name, raw) in records.list(PLUGIN_STATE).await? {
            match serde_json::from_slice::<Switch>(&raw) {
                Ok(s) if !s.enabled => {
                    off.insert(name);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(plugin = %name, error = %e, "unreadable plugin switch skipped")
                }
            }
        }
        *self.inner.disabled.write() = off;
        self.inner.version.store(v, Ordering::Release);
        Ok(())
    }
}

/// Starts the poll that keeps this hub's disabled set current; stops when `stop` turns true.
pub fn spawn_sync(plugins: Plugins, stop: watch::Receiver<bool>) -> JoinHandle<()> {
    records::spawn_poll("plugin switches", stop, move || {
        let plugins = plugins.clone();
        async move { plugins.sync().await }
    })
}

/// One plugin of `GET /api/v1/plugins` (the nex assistant's `PluginInfo`, plus `nodes` and,
/// when nodes run different versions, `versions`).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct PluginEntry {
    /// Plugin (and tool) name.
    pub name: String,
    /// Version (the first node's, by node id, when they differ).
    pub version: Option<String>,
    /// What it does.
    pub description: Option<String>,
    /// Who wrote it.
    pub author: Option<String>,
    /// Capability names.
    pub capabilities: Vec<String>,
    /// Whether its tool is dispatched (switched by `/enable` and `/disable`).
    pub enabled: bool,
    /// JSON Schema of its configuration (`{}` when the manifest has none).
    #[schema(value_type = Object)]
    pub config_schema: Value,
    /// What it needs installed.
    pub dependencies: Vec<String>,
    /// `synchronous` or `asynchronous`.
    pub plugin_type: String,
    /// Ids of the online nodes that loaded it.
    pub nodes: Vec<String>,
    /// Every version seen across nodes, when there is more than one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<String>,
}

/// One tool of `GET /api/v1/tools` (`{name, description, parameters}`); `/tools/{name}`
/// adds `examples` and `nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ToolEntry {
    /// Tool name, as tasks and `server_tools` name it.
    pub name: String,
    /// What it does (`""` when no node described it).
    pub description: String,
    /// JSON Schema of its arguments (`{"type":"object"}` when no node sent one).
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// Example calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub examples: Option<Vec<Value>>,
    /// Ids of the online nodes offering it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
}

/// The online nodes' tool declarations from `/v1/nodes`-shaped views: `(node id, spec)`
/// in node-id order, each described (bare names get no description or schema).
fn online_specs(views: &[Value]) -> Vec<(String, ToolDescription)> {
    let mut nodes: Vec<&Value> = views
        .iter()
        .filter(|v| v["status"] == "online" || v["status"] == "draining")
        .collect();
    nodes.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let mut out = Vec::new();
    for n in nodes {
        let Some(id) = n["id"].as_str() else { continue };
        let specs: Vec<ToolSpec> =
            serde_json::from_value(n["tool_specs"].clone()).unwrap_or_default();
        let mut described: BTreeMap<String, ToolDescription> = specs
            .into_iter()
            .map(|s| match s {
                ToolSpec::Name(n) => ToolDescription::new(n, None, None),
                ToolSpec::Described(d) => d,
            })
            .map(|d| (d.name.clone(), d))
            .collect();
        // Tools named in `tools` without a spec (capabilities) are offered too.
        for t in n["tools"].as_array().into_iter().flatten() {
            if let Some(t) = t.as_str() {
                described
                    .entry(t.to_owned())
                    .or_insert_with(|| ToolDescription::new(t, None, None));
            }
        }
        out.extend(described.into_values().map(|d| (id.to_owned(), d)));
    }
    out
}

/// The tool catalogue of the cluster, by name: every tool an online node offers, described
/// by the first node (by id) that gave a description or schema.
pub fn tools(views: &[Value]) -> Vec<ToolEntry> {
    let mut by_name: BTreeMap<String, ToolEntry> = BTreeMap::new();
    for (node, d) in online_specs(views) {
        let e = by_name.entry(d.name.clone()).or_insert_with(|| ToolEntry {
            name: d.name.clone(),
            description: String::new(),
            parameters: json!({"type": "object"}),
            examples: Some(Vec::new()),
            nodes: Some(Vec::new()),
        });
        if e.description.is_empty()
            && let Some(desc) = &d.description
        {
            e.description = desc.clone();
        }
        if let Some(p) = &d.parameters
            && e.parameters == json!({"type": "object"})
        {
            e.parameters = p.clone();
        }
        if let Some(ex) = &mut e.examples
            && ex.is_empty()
        {
            ex.extend(d.examples.iter().cloned());
        }
        if let Some(n) = &mut e.nodes
            && !n.contains(&node)
        {
            n.push(node);
        }
    }
    by_name.into_values().collect()
}

/// [`tools`] in the list's shape: no `examples`, no `nodes`.
pub fn tool_list(views: &[Value]) -> Vec<ToolEntry> {
    tools(views)
        .into_iter()
        .map(|t| ToolEntry {
            examples: None,
            nodes: None,
            ..t
        })
        .collect()
}

/// Every plugin an online node loaded, one entry per name; `enabled` from `plugins`.
pub fn catalogue(views: &[Value], plugins: &Plugins) -> Vec<PluginEntry> {
    let mut by_name: BTreeMap<String, PluginEntry> = BTreeMap::new();
    for (node, d) in online_specs(views) {
        let Some(p) = d.plugin else { continue };
        let e = by_name
            .entry(d.name.clone())
            .or_insert_with(|| PluginEntry {
                name: d.name.clone(),
                version: p.version.clone(),
                description: d.description.clone(),
                author: p.author.clone(),
                capabilities: p.capabilities.clone(),
                enabled: !plugins.is_disabled(&d.name),
                config_schema: p.config_schema.clone().unwrap_or_else(|| json!({})),
                dependencies: p.dependencies.clone(),
                plugin_type: match p.plugin_type {
                    PluginType::Synchronous => "synchronous",
                    PluginType::Asynchronous => "asynchronous",
                }
                .to_owned(),
                nodes: Vec::new(),
                versions: Vec::new(),
            });
        e.nodes.push(node);
        if let Some(v) = &p.version
            && !e.versions.contains(v)
        {
            e.versions.push(v.clone());
        }
    }
    by_name
        .into_values()
        .map(|mut e| {
            if e.versions.len() < 2 {
                e.versions.clear();
            }
            e
        })
        .collect()
}

/// The search tools of the cluster: names of the tools an online node offers whose plugin
/// declares [`SEARCH_CAPABILITY`], sorted, each once. A switched-off plugin is still listed
/// (the task service refuses its tasks).
pub fn search_tools(views: &[Value]) -> Vec<String> {
    online_specs(views)
        .into_iter()
        .filter(|(_, d)| {
            d.plugin
                .as_ref()
                .is_some_and(|p| p.capabilities.iter().any(|c| c == SEARCH_CAPABILITY))
        })
        .map(|(_, d)| d.name)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Whether `spec` declares an asynchronous plugin, and whether its callbacks may go unsigned
/// (`callback_auth = "token"`).
pub fn async_plugin(spec: &ToolSpec) -> Option<bool> {
    let ToolSpec::Described(d) = spec else {
        return None;
    };
    let p = d.plugin.as_ref()?;
    (p.plugin_type == PluginType::Asynchronous).then(|| p.callback_auth.as_deref() == Some("token"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn view(id: &str, status: &str, specs: Value) -> Value {
        json!({"id": id, "status": status, "tools": [], "tool_specs": specs})
    }

    fn plugin_spec(name: &str, version: &str) -> Value {
        json!({"name": name, "description": "counts words",
               "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
               "plugin": {"version": version, "author": "a", "capabilities": ["count"],
                          "pluginType": "synchronous", "dependencies": ["python3"]}})
    }

    #[tokio::test]
    async fn the_catalogue_merges_nodes_and_honours_switches() {
        let views = vec![
            view("n2", "online", json!([plugin_spec("wc", "1.1"), "echo"])),
            view("n1", "online", json!([plugin_spec("wc", "1.0")])),
            view("n3", "offline", json!([plugin_spec("gone", "1")])),
        ];
        let plugins = Plugins::ephemeral(RecordStore::memory(), "http://h");
        let c = catalogue(&views, &plugins);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].name, "wc");
        assert_eq!(c[0].nodes, vec!["n1", "n2"]);
        assert_eq!(c[0].version.as_deref(), Some("1.0"));
        assert_eq!(c[0].versions, vec!["1.0", "1.1"]);
        assert!(c[0].enabled);
        assert_eq!(c[0].config_schema, json!({}));
        plugins.set_enabled("wc", false).await.unwrap();
        assert!(plugins.is_disabled("wc"));
        assert!(!catalogue(&views, &plugins)[0].enabled);

        let t = tools(&views);
        let names: Vec<_> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["echo", "wc"]);
        assert_eq!(t[1].parameters["properties"]["text"]["type"], "string");
        assert_eq!(t[0].parameters, json!({"type": "object"}));
        assert!(tool_list(&views)[0].nodes.is_none());
    }

    fn capable(name: &str, capabilities: Value) -> Value {
        json!({"name": name, "plugin": {"capabilities": capabilities,
                                        "pluginType": "synchronous"}})
    }

    #[test]
    fn search_tools_are_the_online_plugin_tools_with_the_search_capability() {
        let views = vec![
            view(
                "n2",
                "online",
                json!([
                    capable("doc_search", json!(["search"])),
                    capable("wiki", json!(["text", "search"])),
                    plugin_spec("wc", "1.0"),
                ]),
            ),
            view(
                "n1",
                "draining",
                json!([capable("doc_search", json!(["search"])), "search"]),
            ),
            view(
                "n3",
                "offline",
                json!([capable("gone_search", json!(["search"]))]),
            ),
            view(
                "n4",
                "online",
                json!([{"name": "web_search", "description": "not a plugin"},
                       capable("Searcher", json!(["Search", "searching"]))]),
            ),
        ];
        // Sorted and unique; offline nodes, built-in tools (even one named `search`) and
        // other capabilities do not count, and the capability is matched exactly.
        assert_eq!(search_tools(&views), vec!["doc_search", "wiki"]);
        assert!(search_tools(&[]).is_empty());
    }

    #[tokio::test]
    async fn switches_reach_another_hub_through_the_records() {
        let records = RecordStore::memory();
        let a = Plugins::open(records.clone(), "http://a").await.unwrap();
        let b = Plugins::open(records, "http://b").await.unwrap();
        a.set_enabled("wc", false).await.unwrap();
        assert!(!b.is_disabled("wc"));
        b.sync().await.unwrap();
        assert!(b.is_disabled("wc"));
        a.set_enabled("wc", true).await.unwrap();
        b.sync().await.unwrap();
        assert!(!b.is_disabled("wc"));
        // Both hubs issue the same callback URLs (one secret per cluster).
        let (ca, cb) = (
            a.signer().callback("p", "t", false),
            b.signer().callback("p", "t", false),
        );
        assert_eq!(ca["secret"], cb["secret"]);
    }
}

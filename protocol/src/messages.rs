//! One struct per message type and one enum per direction ([`NodeMessage`], [`HubMessage`]).
//!
//! Shapes follow `shared/PROTOCOL-NOTES.md` field by field; apex-only additions are marked
//! "apex extension" and are always optional, so third-party clients can ignore them. Unknown
//! fields are ignored on decode (clients add fields freely).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Encoding;

/// Declares a direction enum whose variants map 1:1 to wire `type` names, plus the list of those
/// names (used to tell "unknown type" from "bad data" when a frame does not decode).
macro_rules! direction {
    (
        $(#[$meta:meta])*
        $name:ident {
            $( $(#[$vmeta:meta])* $wire:literal => $variant:ident($ty:ty), )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type", content = "data")]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $wire, deserialize_with = "map_only")] $variant($ty), )+
        }

        impl $name {
            /// Every wire `type` name of this direction.
            pub const TYPES: &'static [&'static str] = &[$($wire),+];

            /// The wire `type` name of this message.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $( Self::$variant(_) => $wire, )+
                }
            }
        }

        $(
            impl From<$ty> for $name {
                fn from(m: $ty) -> Self {
                    Self::$variant(m)
                }
            }
        )+
    };
}

/// Deserializes `data` only from a map: serde's derive would also take a sequence of the
/// fields in order, which no client sends and which hides mistakes.
fn map_only<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(V(std::marker::PhantomData))
}

direction! {
    /// A frame sent by a node to the hub, in either dialect.
    NodeMessage {
        /// Native: a node announces itself (sent again after every reconnect).
        "node_register" => NodeRegister(NodeRegister),
        /// Native: periodic liveness and load report.
        "heartbeat" => Heartbeat(Heartbeat),
        /// Native: the node leaves; its remaining tasks migrate.
        "node_unregister" => NodeUnregister(NodeUnregister),
        /// Native (apex extension): stop sending this node new work.
        "node_drain" => NodeDrain(NodeDrain),
        /// Native (apex extension): progress of a running task.
        "task_progress" => TaskProgress(TaskProgress),
        /// Native: the outcome of an assigned task.
        "task_result" => TaskResult(TaskResult),
        /// Native (apex extension): one chunk of a streamed task result, before `task_result`.
        "task_stream" => TaskStream(TaskStream),
        /// Native: a log line for the hub's log channel.
        "log" => Log(Log),
        /// Native: the node asks the hub to call a language model for it.
        "llm_request" => LlmRequest(LlmRequest),
        /// VCP: registration and full replacement of the node's tool list.
        "register_tools" => RegisterTools(RegisterTools),
        /// VCP: the node's addresses.
        "report_ip" => ReportIp(ReportIp),
        /// VCP: static placeholder values (accepted, not used).
        "update_static_placeholders" => UpdateStaticPlaceholders(UpdateStaticPlaceholders),
        /// VCP: the outcome of an `execute_tool`.
        "tool_result" => ToolResult(ToolResult),
        /// VCP: a late result of an asynchronous plugin.
        "plugin_callback_forward" => PluginCallbackForward(PluginCallbackForward),
    }
}

direction! {
    /// A frame sent by the hub to a node, in either dialect.
    HubMessage {
        /// First frame on every connection; clients ignore it.
        "connection_ack" => ConnectionAck(ConnectionAck),
        /// Native: answer to `node_register`. Without `success: true` clients never heartbeat.
        "node_registered" => NodeRegistered(NodeRegistered),
        /// Native: answer to `heartbeat`.
        "heartbeat_ack" => HeartbeatAck(HeartbeatAck),
        /// Native: answer to `node_unregister`.
        "node_unregistered" => NodeUnregistered(NodeUnregistered),
        /// Native: run a task.
        "task_assign" => TaskAssign(TaskAssign),
        /// Native: answer to every `task_result`, accepted or not.
        "task_result_ack" => TaskResultAck(TaskResultAck),
        /// Native (apex extension): stop a task (hub-side timeout or user cancel).
        "task_cancel" => TaskCancel(TaskCancel),
        /// Native: answer to a frame the hub could not use. The connection stays up.
        "error" => Error(ErrorFrame),
        /// Native: a streamed piece of an LLM answer.
        "llm_response_stream" => LlmResponseStream(LlmResponseStream),
        /// Native: the last frame of every LLM call.
        "llm_response" => LlmResponse(LlmResponse),
        /// VCP: run a tool.
        "execute_tool" => ExecuteTool(ExecuteTool),
        /// VCP: cancel a running tool (only to nodes declaring `capabilities.cancelTool`).
        "cancel_tool" => CancelTool(CancelTool),
    }
}

/// `connection_ack.data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionAck {
    /// Id of the hub process.
    pub server_id: String,
    /// Id the hub gave this connection.
    pub client_id: String,
    /// Human-readable greeting.
    pub message: String,
}

/// Kind of node, as declared in `node_register.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeType {
    /// Runs background work.
    #[default]
    Worker,
    /// A user's device offering its own tools.
    Companion,
    /// Anything else (also the value any unknown type string decodes to).
    #[serde(other)]
    Custom,
}

/// A tool as declared in `node_register.tools`: a bare name, or an object with a JSON Schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolSpec {
    /// Just the tool's name (what third-party agents send).
    Name(String),
    /// Name, description and a JSON Schema for the arguments (what `apex-node` sends).
    Described(ToolDescription),
}

impl ToolSpec {
    /// The tool's name, whichever form it came in.
    pub fn name(&self) -> &str {
        match self {
            ToolSpec::Name(n) => n,
            ToolSpec::Described(d) => &d.name,
        }
    }
}

/// A described tool: `{name, description?, parameters?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDescription {
    /// Tool name, unique within the node.
    pub name: String,
    /// What the tool does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the tool's arguments (`toolArgs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Example calls (each an object, e.g. `{"description", "example"}` from a VCP manifest's
    /// `invocationCommands`); shown by `GET /api/v1/tools/{name}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<Value>,
    /// Set when the tool is a plugin the node loaded: its manifest's metadata. Hubs that
    /// predate it ignore the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<Box<PluginInfo>>,
}

impl ToolDescription {
    /// A described tool with no examples and no plugin metadata.
    pub fn new(
        name: impl Into<String>,
        description: Option<String>,
        parameters: Option<Value>,
    ) -> Self {
        Self {
            name: name.into(),
            description,
            parameters,
            examples: Vec::new(),
            plugin: None,
        }
    }
}

/// How a plugin answers: at once, or later through the hub's `/plugin-callback` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginType {
    /// The answer is the plugin process's output.
    #[default]
    Synchronous,
    /// The process answers `{"status":"success","result":{"taskId",…,"status":"pending"}}` at
    /// once and the result comes later by a signed callback.
    Asynchronous,
}

/// A plugin's manifest metadata, in `ToolDescription.plugin`: the fields of the nex
/// assistant's `plugin.json` (`version`, `author`, `capabilities`, `config_schema`,
/// `dependencies`) and the VCP `plugin-manifest.json` (`pluginType`). camelCase on the wire.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PluginInfo {
    /// The plugin's version string, as its manifest gives it.
    pub version: Option<String>,
    /// Who wrote it.
    pub author: Option<String>,
    /// Capability names (`plugin.json`'s `capabilities`, or the VCP manifest's
    /// `invocationCommands[].commandIdentifier`).
    pub capabilities: Vec<String>,
    /// JSON Schema of the plugin's configuration (`config_schema` / `configSchema`).
    pub config_schema: Option<Value>,
    /// What the plugin needs installed (`plugin.json`'s `dependencies`).
    pub dependencies: Vec<String>,
    /// Synchronous or asynchronous.
    pub plugin_type: PluginType,
    /// `"signature"` (default: callbacks must carry `X-Apex-Signature`) or `"token"` (the
    /// per-task token in the callback URL is enough, for plugins that cannot sign).
    pub callback_auth: Option<String>,
    /// The manifest format: `"plugin.json"` or `"plugin-manifest.json"`.
    pub format: Option<String>,
}

/// Load counters a node reports in `node_register.stats` and `heartbeat.stats`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeStats {
    /// Tasks running now.
    pub active_tasks: u64,
    /// Tasks received since the node started.
    pub total_tasks: u64,
    /// Tasks that ended successfully.
    pub completed_tasks: u64,
    /// Tasks that ended with an error.
    pub failed_tasks: u64,
    /// Mean execution time, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub average_response_time: Option<f64>,
    /// When the last task ended (clients send epoch ms or an ISO string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_task_at: Option<Value>,
    /// apex extension: CPU use of the node's machine, percent (0-100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_usage: Option<f64>,
    /// apex extension: memory use of the node's machine, percent (0-100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_usage: Option<f64>,
}

/// `node_register.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRegister {
    /// Stable id the node persists; absent on a first start (the hub then assigns one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Kind of node.
    #[serde(default, rename = "type")]
    pub node_type: NodeType,
    /// Node software version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Capability names (third-party agents repeat their tool names here).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Tools the node offers.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Companion personality (opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personality: Option<Value>,
    /// Node configuration; third-party agents put their concurrency limit in
    /// `config.tasks.maxConcurrent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
    /// apex extension: how many tasks the node runs at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_tasks: Option<u32>,
    /// Load counters (third-party agents always send zeros here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<NodeStats>,
    /// apex extension: encoding of every frame after `node_registered` (default JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// apex extension: ids of tasks the node still runs or holds results for (on re-register).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inflight: Option<Vec<String>>,
    /// apex extension: native dialect version the node speaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// apex extension: language models the node hosts (served through its `llm.chat` tool).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelSpec>,
}

/// A model as declared in `node_register.models`: a bare id, or an object with `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    /// Just the model id.
    Id(String),
    /// `{id, ownedBy?}` (more fields are ignored).
    Described(ModelDescription),
}

impl ModelSpec {
    /// The model id, whichever form it came in.
    pub fn id(&self) -> &str {
        match self {
            ModelSpec::Id(id) => id,
            ModelSpec::Described(d) => &d.id,
        }
    }
}

/// A described model: `{id, ownedBy?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelDescription {
    /// Model id, as clients name it in `model`.
    pub id: String,
    /// Who publishes the model (OpenAI `owned_by`), if the node knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned_by: Option<String>,
}

impl NodeRegister {
    /// The node's concurrency limit: top-level `maxConcurrentTasks`, else
    /// `config.tasks.maxConcurrent`, else `None`.
    pub fn concurrency_limit(&self) -> Option<u32> {
        self.max_concurrent_tasks.or_else(|| {
            self.config
                .as_ref()?
                .get("tasks")?
                .get("maxConcurrent")?
                .as_u64()
                .map(|n| n.min(u32::MAX as u64) as u32)
        })
    }

    /// Every tool name the node offers: `tools`, then `capabilities` not already listed.
    pub fn tool_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::with_capacity(self.tools.len());
        for n in self
            .tools
            .iter()
            .map(|t| t.name())
            .chain(self.capabilities.iter().map(String::as_str))
        {
            if !n.is_empty() && !names.iter().any(|x| x == n) {
                names.push(n.to_owned());
            }
        }
        names
    }
}

/// Hub facts a node may use, in `node_registered.hubInfo`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HubInfo {
    /// Hub software version.
    pub version: String,
    /// Native dialect version ([`crate::PROTOCOL_VERSION`]).
    pub protocol_version: String,
    /// Whether the hub proxies `llm_request`.
    pub llm_available: bool,
    /// How often the hub pings, in milliseconds; a heartbeat at this rate is plenty.
    pub heartbeat_interval_ms: u64,
    /// Silence after which the hub declares the node dead, in milliseconds.
    pub heartbeat_timeout_ms: u64,
    /// Encoding of every later frame, both directions.
    pub encoding: Encoding,
    /// Id of the hub process.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub server_id: String,
}

/// `node_registered.data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRegistered {
    /// The id the node must use from now on.
    pub node_id: String,
    /// Whether the registration was accepted.
    pub success: bool,
    /// Human-readable outcome; the reason when `success` is false.
    pub message: String,
    /// Hub facts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_info: Option<HubInfo>,
}

/// Node status values seen in heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeartbeatStatus {
    /// Ready for work.
    #[default]
    Online,
    /// Working at capacity.
    Busy,
    /// Going away.
    Offline,
    /// Anything else.
    #[serde(other)]
    Unknown,
}

/// `heartbeat.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// Sender's node id.
    #[serde(default)]
    pub node_id: String,
    /// Self-reported status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<HeartbeatStatus>,
    /// Live load counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<NodeStats>,
}

/// `heartbeat_ack.data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatAck {
    /// The node id the heartbeat named.
    pub node_id: String,
    /// False for a node the hub does not know (it should register again).
    pub success: bool,
    /// The hub's view of the node: `online`, `draining` or `unknown`.
    pub status: String,
    /// Hub time, epoch ms.
    pub timestamp: i64,
}

/// `node_unregister.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeUnregister {
    /// Sender's node id.
    #[serde(default)]
    pub node_id: String,
    /// Why the node leaves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `node_unregistered.data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeUnregistered {
    /// The node that left.
    pub node_id: String,
    /// Whether the node was known.
    pub success: bool,
    /// Human-readable outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `node_drain.data` (apex extension): the hub stops sending this node new work; what it runs
/// keeps running.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDrain {
    /// Sender's node id.
    #[serde(default)]
    pub node_id: String,
}

/// `task_assign.data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAssign {
    /// Task id; every frame about this task carries it.
    pub task_id: String,
    /// The node the task is assigned to.
    pub node_id: String,
    /// Tool to run.
    pub tool_name: String,
    /// Capability the task asked for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// Tool arguments (a JSON object).
    #[serde(default)]
    pub tool_args: Value,
    /// The node's time budget for this attempt, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Task priority (higher runs first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// apex extension: attempt number, from 1; echo it in `task_result` and `task_progress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Opaque metadata (apex puts the W3C `traceparent` here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// `task_progress.data` (apex extension).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskProgress {
    /// Task id.
    pub task_id: String,
    /// Sender's node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Attempt the progress belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Percent done, 0 to 100.
    pub progress: f64,
    /// What the task is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A task or call error: `{code, message, details?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Machine-readable code, e.g. `task_timeout`, `capability_not_supported`, `node_lost`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Extra structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl ErrorInfo {
    /// An error with no details.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            details: None,
        }
    }
}

/// `task_result.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResult {
    /// Task id from the `task_assign`.
    pub task_id: String,
    /// Sender's current node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// apex extension: the attempt this result belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Whether the tool succeeded.
    pub success: bool,
    /// The tool's output on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// How long the tool ran, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_time: Option<u64>,
}

/// `task_stream.data` (apex extension): one chunk of a task's streamed output, sent in order
/// before the task's `task_result`. Fenced like a result: chunks of an attempt the task is no
/// longer on are dropped.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskStream {
    /// Task id from the `task_assign`.
    pub task_id: String,
    /// Sender's current node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The attempt the chunk belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Position of the chunk within its attempt, from 0.
    pub seq: u64,
    /// The chunk: a JSON object (for `llm.chat`, an OpenAI `chat.completion.chunk`).
    pub chunk: Value,
}

/// `task_result_ack.data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResultAck {
    /// Task id of the result.
    pub task_id: String,
    /// Node id of the sender.
    pub node_id: String,
    /// True when the result was committed; false when it was stale, duplicate or unknown
    /// (the node should drop it either way).
    pub success: bool,
    /// Why a result was not committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Hub time, epoch ms.
    pub timestamp: i64,
}

/// `task_cancel.data` (apex extension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskCancel {
    /// Task to stop.
    pub task_id: String,
    /// Attempt to stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Why: `timeout`, `cancelled`, `migrated`.
    pub reason: String,
}

/// `log.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Log {
    /// Sender's node id.
    #[serde(default)]
    pub node_id: String,
    /// `trace`, `debug`, `info`, `warn` or `error`.
    #[serde(default)]
    pub level: String,
    /// The log line.
    pub message: String,
    /// Structured fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Value>,
    /// Node time, epoch ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
}

/// `error.data`: the hub could not use a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// `invalid_json`, `unknown_type`, `invalid_payload`, `frame_too_large`, `not_registered`.
    pub code: String,
    /// What was wrong, in a sentence.
    pub message: String,
}

/// An OpenAI chat message `{role, content, name?, tool_calls?, tool_call_id?}` (the OpenAI
/// field names, snake_case, as the message objects of Chat Completions have them).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or the OpenAI content-part array.
    #[serde(default)]
    pub content: Value,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant message's tool calls (OpenAI `tool_calls`: `[{id, type: "function",
    /// function: {name, arguments}}]`), when it made some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// A `tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// `llm_request.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LlmRequest {
    /// Correlates the answer frames.
    pub request_id: String,
    /// Sender's node id.
    #[serde(default)]
    pub node_id: String,
    /// Model to use (also accepted in `options.model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The conversation.
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    /// `{stream, temperature, maxTokens, model, ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Value>,
}

/// Token counts of an LLM call (OpenAI `usage`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Sum of both.
    pub total_tokens: u64,
}

/// `llm_response_stream.data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LlmResponseStream {
    /// From the `llm_request`.
    pub request_id: String,
    /// The requesting node.
    pub node_id: String,
    /// The next piece of text (empty on the `done` frame).
    pub chunk: String,
    /// True on the last stream frame.
    pub done: bool,
    /// Token counts, on the last frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Hub time, epoch ms.
    pub timestamp: i64,
}

/// `llm_response.data`: always the last frame of an LLM call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LlmResponse {
    /// From the `llm_request`.
    pub request_id: String,
    /// The requesting node.
    pub node_id: String,
    /// Whether the call succeeded.
    pub success: bool,
    /// The whole answer text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The tool calls the model made (OpenAI `message.tool_calls` entries, `{id, type:
    /// "function", function: {name, arguments}}`), when the request offered `options.tools`
    /// and the model called some. Hubs that predate it never send it.
    /// (Boxed: this frame shares an enum with small ones.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Box<[Value]>>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// `llm_unavailable`, `rate_limit_exceeded`, `quota_exceeded`, `stream_limit_exceeded`,
    /// `llm_request_failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Whether the answer was streamed.
    pub stream: bool,
    /// Hub time, epoch ms.
    pub timestamp: i64,
}

/// A VCP plugin manifest as received in `register_tools.tools`.
///
/// Only these fields are kept. The client also sends `basePath` (a path on the node) and
/// `pluginSpecificEnvConfig` (the plugin's secrets): they are deliberately not fields here, so
/// they are dropped at decode and can never be stored, logged or returned.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VcpToolManifest {
    /// Tool (plugin) name; what `execute_tool.toolName` names.
    pub name: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Plugin version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Who wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `synchronous`, `asynchronous`, `static`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_type: Option<String>,
    /// Plugin capabilities (opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
}

/// `register_tools.capabilities`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VcpCapabilities {
    /// Whether the node understands `cancel_tool`.
    pub cancel_tool: bool,
}

/// `register_tools.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterTools {
    /// The node's name; VCP nodes have no other id.
    pub server_name: String,
    /// Plugin manifests.
    #[serde(default)]
    pub tools: Vec<VcpToolManifest>,
    /// Optional protocol capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<VcpCapabilities>,
}

/// `report_ip.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReportIp {
    /// The node's name.
    #[serde(rename = "serverName")]
    pub server_name: String,
    /// Non-internal IPv4 addresses.
    #[serde(rename = "localIPs", default)]
    pub local_ips: Vec<String>,
    /// Public address, when the node could find it.
    #[serde(rename = "publicIP", default)]
    pub public_ip: Option<String>,
    /// Port of the node's own HTTP server.
    #[serde(rename = "httpPort", default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
}

/// `update_static_placeholders.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStaticPlaceholders {
    /// The node's name.
    #[serde(default)]
    pub server_name: String,
    /// `{"{{Name}}": "value"}`.
    #[serde(default)]
    pub placeholders: Value,
}

/// `execute_tool.data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteTool {
    /// Correlates the `tool_result`. apex uses `<taskId>.<attempt>`.
    pub request_id: String,
    /// Plugin to run.
    pub tool_name: String,
    /// Plugin arguments.
    #[serde(default)]
    pub tool_args: Value,
}

/// `tool_result.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolResult {
    /// From the `execute_tool`.
    pub request_id: String,
    /// `success` or `error`.
    pub status: String,
    /// The plugin's output (any JSON) on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// A plain string on failure (any JSON is accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// `cancel_tool.data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelTool {
    /// From the `execute_tool`.
    pub request_id: String,
}

/// `plugin_callback_forward.data`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginCallbackForward {
    /// The node's name.
    #[serde(default)]
    pub server_name: String,
    /// Holds `pluginName` and `taskId` of the late result.
    #[serde(default)]
    pub callback_data: Value,
}

/// Builds the VCP `requestId` apex uses for a task attempt: `<taskId>.<attempt>`.
pub fn vcp_request_id(task_id: &str, attempt: u32) -> String {
    format!("{task_id}.{attempt}")
}

/// Splits a VCP `requestId` built by [`vcp_request_id`] into task id and attempt.
///
/// A request id without a numeric suffix is returned whole with no attempt.
pub fn parse_vcp_request_id(request_id: &str) -> (&str, Option<u32>) {
    if let Some((task, attempt)) = request_id.rsplit_once('.')
        && let Ok(a) = attempt.parse::<u32>()
        && !task.is_empty()
        && vcp_request_id(task, a) == request_id
    {
        return (task, Some(a));
    }
    (request_id, None)
}

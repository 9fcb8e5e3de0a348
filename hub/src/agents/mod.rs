//! Agent profiles: per-user configurations of the research system's agents (persona, models,
//! sampling, traits), records of kind [`PROFILE`] in the record store; HTTP in `http::agents`
//! (`/api/agents/profiles…`). The research engine runs an agent with [`Agents::resolve`] and
//! [`Agents::run_args`], as one task of the built-in node tool [`TOOL`] (`agent.run`).
//!
//! Rules:
//! - **Owner.** A profile belongs to the principal that created it (`user_id` is that
//!   principal's owner string, e.g. `user:<id>`); others are told it does not exist; admins see
//!   all.
//! - **Defaults.** The 14 templates of [`defaults`] are not stored until
//!   [`Agents::init_defaults`]. A user's stored default of one `agent_type` has an id derived
//!   from (owner, agent_type) ([`default_id`]) and is written with create-if-absent, so repeated
//!   or concurrent calls, on any number of hubs, store each at most once. Defaults cannot be
//!   deleted (disable them with `is_enabled: false`) and their `agent_type` cannot change.
//! - **Custom profiles** (`POST`, clones) get a random id and `is_custom: true`. Their
//!   `agent_type` is one of [`AGENT_TYPES`] or `custom_<snake_case>` ([`valid_agent_type`]).
//! - **Models.** An empty `role_model` / `fallback_model` means the `[agents]` config's, and an
//!   empty configured role model the gateway's first model, resolved when the agent runs.
//! - **Updates** are compare-and-set on the record (retried), so concurrent partial updates
//!   never lose each other's fields.
//!
//! Listing reads every profile record and filters (as schedules do): fine for thousands of
//! profiles; an owner index is the next step past that.

pub mod defaults;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use defaults::AGENT_TYPES;

use crate::config::Config;
use crate::llm::GatewayHandle;
use crate::model::TaskSpec;
use crate::principal::Principal;
use crate::records::{Kind, RecordStore};
use crate::store;
use crate::tasks::{MAX_WAIT, TaskService};

/// Agent profiles by id (JSON of [`AgentProfile`]).
pub const PROFILE: Kind = "agent_profile";

/// The node tool that runs one agent call (`node/src/tools/agent.rs`).
pub const TOOL: &str = "agent.run";

/// The clusters an agent belongs to.
pub const CLUSTERS: [&str; 4] = ["reasoning", "information", "production", "coordination"];

/// Most characters of `display_name`, `display_name_cn` and `agent_type`.
pub const MAX_NAME_CHARS: usize = 128;
/// Most characters of a model name.
pub const MAX_MODEL_CHARS: usize = 256;
/// Most characters of `persona`.
pub const MAX_PERSONA_CHARS: usize = 20_000;
/// Most items of `responsibilities`, `data_sources`, `enabled_skills`.
pub const MAX_LIST_ITEMS: usize = 64;
/// Most characters of one item of those lists.
pub const MAX_ITEM_CHARS: usize = 256;
/// Most bytes of `traits` and of `pipeline_config`, as JSON.
pub const MAX_OBJECT_BYTES: usize = 16 * 1024;
/// Largest `max_tokens`.
pub const MAX_TOKENS: u64 = 200_000;
/// Most characters of a `/test` task.
pub const MAX_TASK_CHARS: usize = 20_000;

/// How many times an update retries its compare-and-set against concurrent writers.
const UPDATE_ATTEMPTS: usize = 8;

/// How long after the test task's own timeout `/test` still waits for its end.
const TIMEOUT_GRACE: Duration = Duration::from_secs(30);

/// Why an agent-profile call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is not acceptable; `param` names it.
    #[error("{message}")]
    Invalid {
        /// The field.
        param: &'static str,
        /// Why, for people.
        message: String,
    },
    /// No such profile (or one the caller may not see).
    #[error("agent profile `{0}` not found")]
    NotFound(String),
    /// Not allowed on this profile (deleting a default).
    #[error("{0}")]
    Forbidden(String),
    /// Concurrent writers kept replacing the record.
    #[error("agent profile `{0}` changed concurrently; retry")]
    Conflict(String),
    /// No online node offers [`TOOL`].
    #[error("no online node offers `agent.run`; start an apex-node")]
    NoRunner,
    /// The agent's run failed (the model, or the task).
    #[error("the agent run failed: {0}")]
    RunFailed(String),
    /// The task service refused or lost the run.
    #[error(transparent)]
    Tasks(#[from] crate::tasks::Error),
    /// The record store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

fn invalid(param: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        param,
        message: message.into(),
    }
}

/// A default agent template (`GET /api/agents/profiles/defaults`): a profile without id,
/// owner, flags or times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentTemplate {
    /// One of [`AGENT_TYPES`].
    pub agent_type: String,
    /// English name.
    pub display_name: String,
    /// Chinese name.
    pub display_name_cn: String,
    /// `reasoning`, `information`, `production` or `coordination`.
    pub cluster: String,
    /// Gateway model (`agents.role_model`; empty: the gateway's first model).
    pub role_model: String,
    /// Model asked when the role model fails (`agents.fallback_model`; empty: none).
    pub fallback_model: String,
    /// Sampling temperature, 0 to 2.
    pub temperature: f64,
    /// Longest answer, in tokens.
    pub max_tokens: u32,
    /// The system prompt.
    pub persona: String,
    /// Free-form traits (`risk_preference`, `creativity`, …).
    #[schema(value_type = Object)]
    pub traits: Value,
    /// What the agent is responsible for.
    pub responsibilities: Vec<String>,
    /// Free-form settings of the research pipeline (`stage`, …).
    #[schema(value_type = Object)]
    pub pipeline_config: Value,
    /// Data sources the agent draws on (`arxiv`, …).
    pub data_sources: Vec<String>,
    /// Skills the agent may use (`/survey`, …).
    pub enabled_skills: Vec<String>,
}

/// A stored agent profile, as the API shows it (times RFC 3339, UTC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentProfile {
    /// Id (UUID).
    pub id: String,
    /// The owner (`user:<id>`, `key:<id>` or `admin`).
    pub user_id: String,
    /// One of [`AGENT_TYPES`] or `custom_<snake_case>`.
    pub agent_type: String,
    /// English name, 1 to 128 characters.
    pub display_name: String,
    /// Chinese name, at most 128 characters.
    pub display_name_cn: String,
    /// `reasoning`, `information`, `production` or `coordination`.
    pub cluster: String,
    /// Gateway model (`provider/model`, an alias or a model name); empty: `agents.role_model`,
    /// else the gateway's first model.
    pub role_model: String,
    /// Model asked when the role model fails; empty: `agents.fallback_model`, else none.
    pub fallback_model: String,
    /// Sampling temperature, 0 to 2.
    pub temperature: f64,
    /// Longest answer, in tokens (1 to 200000).
    pub max_tokens: u32,
    /// The system prompt.
    pub persona: String,
    /// Free-form traits (a JSON object).
    #[schema(value_type = Object)]
    pub traits: Value,
    /// What the agent is responsible for.
    pub responsibilities: Vec<String>,
    /// Free-form pipeline settings (a JSON object).
    #[schema(value_type = Object)]
    pub pipeline_config: Value,
    /// Data sources.
    pub data_sources: Vec<String>,
    /// Enabled skills.
    pub enabled_skills: Vec<String>,
    /// Whether it was created (or cloned) by the user rather than from a default template.
    pub is_custom: bool,
    /// Whether the research engine may use it.
    pub is_enabled: bool,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

impl AgentProfile {
    /// A profile of `owner` from template `t`.
    fn from_template(t: AgentTemplate, id: String, owner: &str, now: &str) -> Self {
        Self {
            id,
            user_id: owner.to_owned(),
            agent_type: t.agent_type,
            display_name: t.display_name,
            display_name_cn: t.display_name_cn,
            cluster: t.cluster,
            role_model: t.role_model,
            fallback_model: t.fallback_model,
            temperature: t.temperature,
            max_tokens: t.max_tokens,
            persona: t.persona,
            traits: t.traits,
            responsibilities: t.responsibilities,
            pipeline_config: t.pipeline_config,
            data_sources: t.data_sources,
            enabled_skills: t.enabled_skills,
            is_custom: false,
            is_enabled: true,
            created_at: now.to_owned(),
            updated_at: now.to_owned(),
        }
    }
}

/// Fields of a create (`POST`) or a partial update (`PUT`): every field optional. `id`,
/// `user_id`, `is_custom`, `created_at` and `updated_at` are accepted and ignored (so a client
/// may send a profile back whole); any other unknown field is a 400.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"agent_type": "custom_explorer", "display_name": "Custom Explorer",
    "display_name_cn": "自定义探索者", "cluster": "information", "temperature": 0.8,
    "max_tokens": 6000, "persona": "You explore deep-learning literature...",
    "traits": {"creativity": "very_high"}, "responsibilities": ["literature search"],
    "data_sources": ["arxiv"], "enabled_skills": ["/survey"]}))]
pub struct ProfileFields {
    /// One of the 14 default types or `custom_<snake_case>` (required on create).
    pub agent_type: Option<String>,
    /// English name (required on create for a `custom_` type).
    pub display_name: Option<String>,
    /// Chinese name.
    pub display_name_cn: Option<String>,
    /// `reasoning`, `information`, `production` or `coordination` (required on create for a
    /// `custom_` type).
    pub cluster: Option<String>,
    /// Gateway model; empty: the configured default.
    pub role_model: Option<String>,
    /// Fallback model; empty: the configured default.
    pub fallback_model: Option<String>,
    /// 0 to 2.
    pub temperature: Option<f64>,
    /// 1 to 200000.
    pub max_tokens: Option<u64>,
    /// The system prompt (required on create for a `custom_` type).
    pub persona: Option<String>,
    /// A JSON object.
    #[schema(value_type = Option<Object>)]
    pub traits: Option<Value>,
    /// Strings.
    pub responsibilities: Option<Vec<String>>,
    /// A JSON object.
    #[schema(value_type = Option<Object>)]
    pub pipeline_config: Option<Value>,
    /// Strings.
    pub data_sources: Option<Vec<String>>,
    /// Strings.
    pub enabled_skills: Option<Vec<String>>,
    /// Default true.
    pub is_enabled: Option<bool>,
    /// Read-only, ignored.
    #[serde(default)]
    #[schema(ignore)]
    pub id: Option<Value>,
    /// Read-only, ignored.
    #[serde(default)]
    #[schema(ignore)]
    pub user_id: Option<Value>,
    /// Read-only, ignored.
    #[serde(default)]
    #[schema(ignore)]
    pub is_custom: Option<Value>,
    /// Read-only, ignored.
    #[serde(default)]
    #[schema(ignore)]
    pub created_at: Option<Value>,
    /// Read-only, ignored.
    #[serde(default)]
    #[schema(ignore)]
    pub updated_at: Option<Value>,
}

/// What `POST /api/agents/profiles/{id}/test` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TestResult {
    /// The profile's id.
    pub agent_id: String,
    /// Its type.
    pub agent_type: String,
    /// The task given.
    pub task: String,
    /// The answer.
    pub result: String,
    /// Total tokens of the call (0 if the upstream reported none).
    pub tokens_used: u64,
    /// How long the agent's run took.
    pub duration_ms: u64,
    /// The model that answered.
    pub model_used: String,
}

/// Whether `t` is an accepted `agent_type`: one of [`AGENT_TYPES`], or `custom_` followed by
/// lowercase snake case (`[a-z0-9]` words joined by single `_`), at most 128 characters.
pub fn valid_agent_type(t: &str) -> bool {
    if AGENT_TYPES.contains(&t) {
        return true;
    }
    let Some(rest) = t.strip_prefix("custom_") else {
        return false;
    };
    t.len() <= MAX_NAME_CHARS
        && !rest.is_empty()
        && rest.split('_').all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

fn agent_type_error() -> Error {
    invalid(
        "agent_type",
        format!(
            "Invalid agent_type: must be one of [{}] or custom_<snake_case>",
            AGENT_TYPES.join(", ")
        ),
    )
}

fn cluster_error() -> Error {
    invalid(
        "cluster",
        format!("Invalid cluster: must be one of [{}]", CLUSTERS.join(", ")),
    )
}

/// Checks `cluster` is one of [`CLUSTERS`].
///
/// # Errors
/// [`Error::Invalid`] naming `cluster` and the allowed values.
pub fn check_cluster(cluster: &str) -> Result<(), Error> {
    if CLUSTERS.contains(&cluster) {
        Ok(())
    } else {
        Err(cluster_error())
    }
}

/// The id of `owner`'s stored default of `agent_type`: a UUID (version 8) of the SHA-256 of
/// both, the same at every hub, so storing it is create-if-absent.
pub fn default_id(owner: &str, agent_type: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"apex agent default profile\0");
    h.update(owner.as_bytes());
    h.update(b"\0");
    h.update(agent_type.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

fn check_len(param: &'static str, v: &str, min: usize, max: usize) -> Result<(), Error> {
    let n = v.chars().count();
    if n < min || n > max {
        return Err(if min == 0 {
            invalid(param, format!("`{param}` must be at most {max} characters"))
        } else {
            invalid(
                param,
                format!("`{param}` must be {min} to {max} characters"),
            )
        });
    }
    Ok(())
}

fn check_model(param: &'static str, v: &str) -> Result<(), Error> {
    check_len(param, v, 0, MAX_MODEL_CHARS)?;
    if v.chars().any(char::is_whitespace) {
        return Err(invalid(
            param,
            format!(
                "`{param}` must be a model name without spaces (`provider/model`, an alias, or a model)"
            ),
        ));
    }
    Ok(())
}

fn check_list(param: &'static str, v: &[String]) -> Result<(), Error> {
    if v.len() > MAX_LIST_ITEMS {
        return Err(invalid(
            param,
            format!("`{param}` must have at most {MAX_LIST_ITEMS} items"),
        ));
    }
    if v.iter()
        .any(|s| s.trim().is_empty() || s.chars().count() > MAX_ITEM_CHARS)
    {
        return Err(invalid(
            param,
            format!("each item of `{param}` must be 1 to {MAX_ITEM_CHARS} characters"),
        ));
    }
    Ok(())
}

fn check_object(param: &'static str, v: &Value) -> Result<(), Error> {
    if !v.is_object() {
        return Err(invalid(param, format!("`{param}` must be a JSON object")));
    }
    if v.to_string().len() > MAX_OBJECT_BYTES {
        return Err(invalid(
            param,
            format!("`{param}` must be at most {MAX_OBJECT_BYTES} bytes of JSON"),
        ));
    }
    Ok(())
}

/// Checks every field of `p`.
///
/// # Errors
/// [`Error::Invalid`] naming the first field at fault.
pub fn validate(p: &AgentProfile) -> Result<(), Error> {
    if !valid_agent_type(&p.agent_type) {
        return Err(agent_type_error());
    }
    check_len("display_name", p.display_name.trim(), 1, MAX_NAME_CHARS)?;
    check_len("display_name_cn", &p.display_name_cn, 0, MAX_NAME_CHARS)?;
    check_cluster(&p.cluster)?;
    check_model("role_model", &p.role_model)?;
    check_model("fallback_model", &p.fallback_model)?;
    if !(p.temperature.is_finite() && (0.0..=2.0).contains(&p.temperature)) {
        return Err(invalid(
            "temperature",
            "`temperature` must be a number from 0 to 2",
        ));
    }
    if !(1..=MAX_TOKENS).contains(&u64::from(p.max_tokens)) {
        return Err(invalid(
            "max_tokens",
            format!("`max_tokens` must be an integer from 1 to {MAX_TOKENS}"),
        ));
    }
    check_len("persona", &p.persona, 0, MAX_PERSONA_CHARS)?;
    check_object("traits", &p.traits)?;
    check_list("responsibilities", &p.responsibilities)?;
    check_object("pipeline_config", &p.pipeline_config)?;
    check_list("data_sources", &p.data_sources)?;
    check_list("enabled_skills", &p.enabled_skills)?;
    Ok(())
}

/// Applies the given fields of `f` to `p` (the read-only ones are ignored). `agent_type` is
/// checked here; the rest by [`validate`].
fn apply(p: &mut AgentProfile, f: ProfileFields) -> Result<(), Error> {
    if let Some(t) = f.agent_type {
        if !valid_agent_type(&t) {
            return Err(agent_type_error());
        }
        p.agent_type = t;
    }
    if let Some(v) = f.display_name {
        p.display_name = v.trim().to_owned();
    }
    if let Some(v) = f.display_name_cn {
        p.display_name_cn = v.trim().to_owned();
    }
    if let Some(v) = f.cluster {
        p.cluster = v;
    }
    if let Some(v) = f.role_model {
        p.role_model = v;
    }
    if let Some(v) = f.fallback_model {
        p.fallback_model = v;
    }
    if let Some(v) = f.temperature {
        p.temperature = v;
    }
    if let Some(v) = f.max_tokens {
        if !(1..=MAX_TOKENS).contains(&v) {
            return Err(invalid(
                "max_tokens",
                format!("`max_tokens` must be an integer from 1 to {MAX_TOKENS}"),
            ));
        }
        p.max_tokens = v as u32;
    }
    if let Some(v) = f.persona {
        p.persona = v;
    }
    if let Some(v) = f.traits {
        p.traits = v;
    }
    if let Some(v) = f.responsibilities {
        p.responsibilities = v;
    }
    if let Some(v) = f.pipeline_config {
        p.pipeline_config = v;
    }
    if let Some(v) = f.data_sources {
        p.data_sources = v;
    }
    if let Some(v) = f.enabled_skills {
        p.enabled_skills = v;
    }
    if let Some(v) = f.is_enabled {
        p.is_enabled = v;
    }
    Ok(())
}

fn now() -> String {
    crate::schedules::rfc3339(apex_protocol::now_ms())
}

fn encode(p: &AgentProfile) -> Result<Vec<u8>, Error> {
    // A profile is plain data: serializing it cannot fail, but say so rather than panic.
    serde_json::to_vec(p).map_err(|e| {
        Error::Store(store::Error::Unavailable {
            what: "agent profile".to_owned(),
            reason: e.to_string(),
        })
    })
}

fn decode(raw: &[u8]) -> Option<AgentProfile> {
    serde_json::from_slice(raw).ok()
}

/// The position of a type among the templates (customs after them), for listing order.
fn rank(p: &AgentProfile) -> (bool, usize) {
    let i = AGENT_TYPES
        .iter()
        .position(|t| *t == p.agent_type)
        .unwrap_or(AGENT_TYPES.len());
    (p.is_custom, i)
}

/// The agent profiles of this hub's record store. Cheap to clone.
#[derive(Clone)]
pub struct Agents {
    records: RecordStore,
    tasks: TaskService,
    gateway: Arc<GatewayHandle>,
    config: Arc<Config>,
}

impl Agents {
    /// Profiles in `records`, run through `tasks` (`/test`); `gateway` names the first model
    /// when no model is configured; `config` holds `[agents]` and the task defaults.
    pub fn new(
        records: RecordStore,
        tasks: TaskService,
        gateway: Arc<GatewayHandle>,
        config: Arc<Config>,
    ) -> Self {
        Self {
            records,
            tasks,
            gateway,
            config,
        }
    }

    /// The 14 default templates, with the configured models.
    pub fn defaults(&self) -> Vec<AgentTemplate> {
        defaults::templates(&self.config.agents)
    }

    async fn all(&self) -> Result<Vec<AgentProfile>, Error> {
        Ok(self
            .records
            .list(PROFILE)
            .await?
            .iter()
            .filter_map(|(_, raw)| decode(raw))
            .collect())
    }

    /// The caller's profiles (admins: everyone's), optionally only those of `cluster` and of
    /// `is_enabled`; defaults in template order, then custom ones oldest first.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `cluster`; [`Error::Store`].
    pub async fn list(
        &self,
        caller: &Principal,
        cluster: Option<&str>,
        is_enabled: Option<bool>,
    ) -> Result<Vec<AgentProfile>, Error> {
        if let Some(c) = cluster {
            check_cluster(c)?;
        }
        let mut out: Vec<AgentProfile> = self
            .all()
            .await?
            .into_iter()
            .filter(|p| caller.sees(Some(&p.user_id)))
            .filter(|p| cluster.is_none_or(|c| p.cluster == c))
            .filter(|p| is_enabled.is_none_or(|e| p.is_enabled == e))
            .collect();
        out.sort_by(|a, b| {
            rank(a)
                .cmp(&rank(b))
                .then_with(|| a.created_at.cmp(&b.created_at))
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// Stores the default profiles the caller does not have yet; returns how many it stored
    /// (14 the first time, 0 after). Create-if-absent per (owner, agent_type).
    ///
    /// # Errors
    /// [`Error::Store`] (the defaults stored before the failure stay).
    pub async fn init_defaults(&self, caller: &Principal) -> Result<usize, Error> {
        let owner = caller.owner();
        let now = now();
        let mut created = 0;
        for t in self.defaults() {
            let id = default_id(owner, &t.agent_type);
            let p = AgentProfile::from_template(t, id, owner, &now);
            if self
                .records
                .create(PROFILE, &p.id, &encode(&p)?, None)
                .await?
            {
                created += 1;
            }
        }
        Ok(created)
    }

    /// Validates and stores a custom profile of the caller. A missing field of a default type
    /// comes from its template; a `custom_` type needs `display_name`, `cluster` and `persona`
    /// (the rest default to temperature 0.7, 4000 tokens, empty lists and objects).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field; [`Error::Store`].
    pub async fn create(
        &self,
        caller: &Principal,
        fields: ProfileFields,
    ) -> Result<AgentProfile, Error> {
        let Some(agent_type) = fields.agent_type.clone() else {
            return Err(invalid("agent_type", "`agent_type` is required"));
        };
        if !valid_agent_type(&agent_type) {
            return Err(agent_type_error());
        }
        let template = match defaults::template(&self.config.agents, &agent_type) {
            Some(t) => t,
            None => {
                for (param, given) in [
                    ("display_name", fields.display_name.is_some()),
                    ("cluster", fields.cluster.is_some()),
                    ("persona", fields.persona.is_some()),
                ] {
                    if !given {
                        return Err(invalid(
                            param,
                            format!("`{param}` is required for a custom agent_type"),
                        ));
                    }
                }
                AgentTemplate {
                    agent_type: agent_type.clone(),
                    display_name: String::new(),
                    display_name_cn: String::new(),
                    cluster: String::new(),
                    role_model: String::new(),
                    fallback_model: String::new(),
                    temperature: 0.7,
                    max_tokens: 4000,
                    persona: String::new(),
                    traits: json!({}),
                    responsibilities: Vec::new(),
                    pipeline_config: json!({}),
                    data_sources: Vec::new(),
                    enabled_skills: Vec::new(),
                }
            }
        };
        let now = now();
        let mut p = AgentProfile::from_template(
            template,
            uuid::Uuid::new_v4().to_string(),
            caller.owner(),
            &now,
        );
        p.is_custom = true;
        apply(&mut p, fields)?;
        validate(&p)?;
        self.records.put(PROFILE, &p.id, &encode(&p)?, None).await?;
        Ok(p)
    }

    async fn get_raw(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<(Vec<u8>, AgentProfile), Error> {
        let raw = self
            .records
            .get(PROFILE, id)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        match decode(&raw) {
            Some(p) if caller.sees(Some(&p.user_id)) => Ok((raw, p)),
            _ => Err(Error::NotFound(id.to_owned())),
        }
    }

    /// Profile `id` if the caller may see it.
    ///
    /// # Errors
    /// [`Error::NotFound`] (also for another owner's); [`Error::Store`].
    pub async fn get(&self, caller: &Principal, id: &str) -> Result<AgentProfile, Error> {
        Ok(self.get_raw(caller, id).await?.1)
    }

    /// Applies the given fields to profile `id` (compare-and-set, retried against concurrent
    /// writers). A default profile's `agent_type` cannot change.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Invalid`] naming the field; [`Error::Conflict`];
    /// [`Error::Store`].
    pub async fn update(
        &self,
        caller: &Principal,
        id: &str,
        fields: ProfileFields,
    ) -> Result<AgentProfile, Error> {
        for _ in 0..UPDATE_ATTEMPTS {
            let (raw, mut p) = self.get_raw(caller, id).await?;
            if !p.is_custom
                && fields
                    .agent_type
                    .as_deref()
                    .is_some_and(|t| t != p.agent_type)
            {
                return Err(invalid(
                    "agent_type",
                    "the agent_type of a default profile cannot change; clone it instead",
                ));
            }
            apply(&mut p, fields.clone())?;
            validate(&p)?;
            p.updated_at = now();
            let bytes = encode(&p)?;
            if self
                .records
                .compare_and_set(PROFILE, id, Some(&raw), Some(&bytes), None)
                .await?
            {
                return Ok(p);
            }
        }
        Err(Error::Conflict(id.to_owned()))
    }

    /// Deletes custom profile `id`.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Forbidden`] for a default profile; [`Error::Store`].
    pub async fn delete(&self, caller: &Principal, id: &str) -> Result<(), Error> {
        let (raw, p) = self.get_raw(caller, id).await?;
        if !p.is_custom {
            // The seed API's message, word for word (clients match on it).
            return Err(Error::Forbidden("Cannot delete default agents".to_owned()));
        }
        if !self
            .records
            .compare_and_set(PROFILE, id, Some(&raw), None, None)
            .await?
            && self.records.get(PROFILE, id).await?.is_some()
        {
            // Changed meanwhile (still custom: the type of a record never changes): delete.
            self.records.delete(PROFILE, id).await?;
        }
        Ok(())
    }

    /// A custom copy of profile `id` for the caller, its `display_name` ending " (Clone)".
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Store`].
    pub async fn clone_profile(&self, caller: &Principal, id: &str) -> Result<AgentProfile, Error> {
        let mut p = self.get(caller, id).await?;
        const SUFFIX: &str = " (Clone)";
        let keep = MAX_NAME_CHARS - SUFFIX.len();
        let base: String = p.display_name.chars().take(keep).collect();
        p.display_name = format!("{base}{SUFFIX}");
        let now = now();
        p.id = uuid::Uuid::new_v4().to_string();
        p.user_id = caller.owner().to_owned();
        p.is_custom = true;
        p.created_at = now.clone();
        p.updated_at = now;
        self.records.put(PROFILE, &p.id, &encode(&p)?, None).await?;
        Ok(p)
    }

    /// The profile the research engine runs for `owner`'s `agent_type`: the owner's stored,
    /// enabled profile of that type (a custom one before a default, then the most recently
    /// updated), else the default template of that type (with `id` empty), else `None`.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn resolve(
        &self,
        owner: &str,
        agent_type: &str,
    ) -> Result<Option<AgentProfile>, Error> {
        let best = self
            .all()
            .await?
            .into_iter()
            .filter(|p| p.user_id == owner && p.agent_type == agent_type && p.is_enabled)
            .max_by(|a, b| {
                (a.is_custom, &a.updated_at, &a.id).cmp(&(b.is_custom, &b.updated_at, &b.id))
            });
        if best.is_some() {
            return Ok(best);
        }
        Ok(defaults::template(&self.config.agents, agent_type)
            .map(|t| AgentProfile::from_template(t, String::new(), owner, "")))
    }

    /// The role model and fallback model `profile` runs with: its own, else `[agents]`'s, and
    /// for the role model else the gateway's first model (empty if it has none: the hub's
    /// `llm_request` handling then picks). A fallback equal to the role model is dropped.
    pub fn models(&self, profile: &AgentProfile) -> (String, String) {
        let cfg = &self.config.agents;
        let pick = |own: &str, configured: &str| {
            if own.is_empty() {
                configured.to_owned()
            } else {
                own.to_owned()
            }
        };
        let mut role = pick(&profile.role_model, &cfg.role_model);
        if role.is_empty() {
            role = self
                .gateway
                .get()
                .models()
                .into_iter()
                .next()
                .map(|m| m.id)
                .unwrap_or_default();
        }
        let mut fallback = pick(&profile.fallback_model, &cfg.fallback_model);
        if fallback == role {
            fallback.clear();
        }
        (role, fallback)
    }

    /// The arguments of one [`TOOL`] (`agent.run`) call of `profile` on `task`, with the
    /// dependencies' outputs `inputs` (objects `{task_id, agent_type, description, output}`):
    /// `{agent_type, persona, model, fallback_model?, temperature, max_tokens, task, inputs?}`
    /// with the models of [`Agents::models`]. Add `response_format` (a JSON Schema object) to
    /// ask for another structure than the default.
    pub fn run_args(&self, profile: &AgentProfile, task: &str, inputs: Vec<Value>) -> Value {
        let (model, fallback) = self.models(profile);
        let mut args = json!({
            "agent_type": profile.agent_type,
            "persona": profile.persona,
            "model": model,
            "temperature": profile.temperature,
            "max_tokens": profile.max_tokens,
            "task": task,
        });
        if !fallback.is_empty() {
            args["fallback_model"] = Value::String(fallback);
        }
        if !inputs.is_empty() {
            args["inputs"] = Value::Array(inputs);
        }
        args
    }

    /// Runs profile `id` on `task` once, as an `agent.run` task of the caller, and waits for
    /// its answer.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `task`; [`Error::NotFound`]; [`Error::NoRunner`] when no
    /// online node offers `agent.run`; [`Error::RunFailed`]; [`Error::Tasks`];
    /// [`Error::Store`].
    pub async fn test(
        &self,
        caller: &Principal,
        id: &str,
        task: &str,
    ) -> Result<TestResult, Error> {
        if task.trim().is_empty() || task.chars().count() > MAX_TASK_CHARS {
            return Err(invalid(
                "task",
                format!("`task` must be 1 to {MAX_TASK_CHARS} characters"),
            ));
        }
        let p = self.get(caller, id).await?;
        let views = self.tasks.node_views().await?;
        if !crate::plugins::tool_list(&views)
            .iter()
            .any(|t| t.name == TOOL)
        {
            return Err(Error::NoRunner);
        }
        let began = Instant::now();
        let spec = TaskSpec {
            tool: TOOL.to_owned(),
            args: self.run_args(&p, task, Vec::new()),
            description: Some(format!("agent profile test: {}", p.agent_type)),
            priority: self.config.default_priority,
            timeout_seconds: self.config.default_task_timeout_seconds,
            max_attempts: 1,
            idempotency_key: None,
            pinned_node: None,
            capability: None,
            owner: None,
        };
        let deadline =
            began + Duration::from_secs_f64(spec.timeout_seconds.max(0.0)) + TIMEOUT_GRACE;
        let submitted = self.tasks.submit(caller, vec![spec]).await?;
        let Some((task_row, _)) = submitted.into_iter().next() else {
            return Err(Error::RunFailed("the task service accepted no task".into()));
        };
        let task_id = task_row.id.clone();
        let done = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = self
                .tasks
                .get(caller, &task_id, left.min(MAX_WAIT))
                .await?
                .ok_or_else(|| Error::RunFailed(format!("task {task_id} is gone")))?;
            if got.status.is_terminal() {
                break got;
            }
            if Instant::now() >= deadline {
                return Err(Error::RunFailed(format!(
                    "task {task_id} is still {} after its timeout",
                    got.status.as_str()
                )));
            }
        };
        let Some(out) = done.result.filter(|_| done.error.is_none()) else {
            let why = done
                .error
                .map(|e| format!("{}: {}", e.code, e.message))
                .unwrap_or_else(|| format!("task {task_id} ended {}", done.status.as_str()));
            return Err(Error::RunFailed(why));
        };
        let text = |k: &str| out.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Ok(TestResult {
            agent_id: p.id,
            agent_type: p.agent_type,
            task: task.to_owned(),
            result: text("result"),
            tokens_used: out.get("tokens_used").and_then(Value::as_u64).unwrap_or(0),
            duration_ms: out
                .get("duration_ms")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| began.elapsed().as_millis() as u64),
            model_used: text("model_used"),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

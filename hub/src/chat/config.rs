//! The `[chat]` table: conversations of `/api/v1/chat` (model choice, context window, busy
//! sessions, retention). Environment: `APEX_CHAT__<KEY>`. Not reloadable.

use serde::{Deserialize, Serialize};

/// What a message to a session that is answering another one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Busy {
    /// Wait for the turn in progress to end (up to `busy_wait_secs`), then run.
    Wait,
    /// Answer 409 `session_busy` at once.
    Reject,
}

/// `[chat]`. See the README's "Conversations" section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// The node-hosted model of `model_type: "local_small"` (and of `auto_select` when it picks
    /// a local model). Default none: the smallest node-hosted model online (by the parameter
    /// count in its name, e.g. `qwen2.5-0.5b`, else the first by name).
    pub local_model: Option<String>,
    /// The provider model of `model_type: "cloud_large"` and `"plugin"` (a gateway model name
    /// or alias). Default none: the first model a configured provider lists.
    pub cloud_model: Option<String>,
    /// `auto_select`: a local model is chosen when one is online and the prompt (the new
    /// message plus the session's context) has fewer tokens than this; otherwise the cloud
    /// model. When the first choice is not available the other is used. Default 2000.
    pub auto_local_max_tokens: u64,
    /// Most tokens of a session's working context sent to the model (system prompt, summary
    /// and messages); past it the oldest turns leave the context (the history keeps them).
    /// 64 to 10000000. Default 8000.
    pub context_max_tokens: u64,
    /// Whether turns that leave the context are summarised by an `llm.summarize` task on a
    /// node (when one offers the tool), the summary then sent as a system message. Default
    /// false.
    pub summarize: bool,
    /// The system prompt of a request that gives none. Default none.
    pub system_prompt: Option<String>,
    /// A second message to a session while it answers: `wait` (default) or `reject` (409).
    pub busy: Busy,
    /// `busy = "wait"`: longest wait for the session, in seconds (then 409). 1 to 3600.
    /// Default 120.
    pub busy_wait_secs: u64,
    /// Days a session is kept after its last message; 0 keeps sessions forever. Default 0.
    pub retention_days: u64,
    /// Whether model calls ask the upstream for token log-probabilities (`logprobs: true`),
    /// from which an answer's `confidence` is computed. Turn off for upstreams that refuse
    /// the parameter. Default true.
    pub logprobs: bool,
    /// Longest `message`, in bytes. Default 100000.
    pub max_message_bytes: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            local_model: None,
            cloud_model: None,
            auto_local_max_tokens: 2000,
            context_max_tokens: 8000,
            summarize: false,
            system_prompt: None,
            busy: Busy::Wait,
            busy_wait_secs: 120,
            retention_days: 0,
            logprobs: true,
            max_message_bytes: 100_000,
        }
    }
}

impl ChatConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// `(key, reason)` for the first bad key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(64..=10_000_000).contains(&self.context_max_tokens) {
            return Err((
                "chat.context_max_tokens",
                "must be 64 to 10000000".to_owned(),
            ));
        }
        if !(1..=3600).contains(&self.busy_wait_secs) {
            return Err(("chat.busy_wait_secs", "must be 1 to 3600".to_owned()));
        }
        if self.retention_days > 36_500 {
            return Err(("chat.retention_days", "must be at most 36500".to_owned()));
        }
        if !(1..=10_000_000).contains(&self.max_message_bytes) {
            return Err(("chat.max_message_bytes", "must be 1 to 10000000".to_owned()));
        }
        for (key, v) in [
            ("chat.local_model", &self.local_model),
            ("chat.cloud_model", &self.cloud_model),
        ] {
            if v.as_deref().is_some_and(|m| m.trim().is_empty()) {
                return Err((key, "must not be empty".to_owned()));
            }
        }
        Ok(())
    }
}

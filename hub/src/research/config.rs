//! The `[research]` table: research sessions (`/api/research/sessions…`). Environment:
//! `APEX_RESEARCH__<KEY>`. Not reloadable.

use serde::{Deserialize, Serialize};

/// `[research]`. See the README's "Research sessions" section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResearchConfig {
    /// Most research tasks the coordinator may plan (the plan's JSON Schema `maxItems`; a
    /// longer plan is cut to it). 1 to 20000. Default 12.
    pub max_plan_tasks: usize,
    /// Budget of each agent step (an `agent.run` task), in seconds from its submission. 1 to
    /// 86400. Default 600.
    pub task_timeout_seconds: f64,
    /// Assignments an agent step may use before a node loss fails it (`max_attempts` of its
    /// task). 1 to 10. Default 3.
    pub max_attempts: u32,
    /// Most characters of one task's output passed to the tasks that depend on it and to the
    /// synthesis (the rest is cut). 100 to 1000000. Default 8000.
    pub max_input_chars: usize,
    /// Most agent steps of one run submitted and not yet ended; the others of a wide group
    /// wait their turn (a step's `task_timeout_seconds` counts from its submission). 1 to
    /// 100000. Default 256.
    pub max_parallel_steps: usize,
}

impl Default for ResearchConfig {
    fn default() -> Self {
        Self {
            max_plan_tasks: 12,
            task_timeout_seconds: 600.0,
            max_attempts: 3,
            max_input_chars: 8000,
            max_parallel_steps: 256,
        }
    }
}

impl ResearchConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// `(key, reason)` for the first bad key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=super::graph::MAX_TASKS).contains(&self.max_plan_tasks) {
            return Err(("research.max_plan_tasks", "must be 1 to 20000".to_owned()));
        }
        if !(1.0..=86_400.0).contains(&self.task_timeout_seconds) {
            return Err((
                "research.task_timeout_seconds",
                "must be 1 to 86400".to_owned(),
            ));
        }
        if !(1..=10).contains(&self.max_attempts) {
            return Err(("research.max_attempts", "must be 1 to 10".to_owned()));
        }
        if !(100..=1_000_000).contains(&self.max_input_chars) {
            return Err((
                "research.max_input_chars",
                "must be 100 to 1000000".to_owned(),
            ));
        }
        if !(1..=100_000).contains(&self.max_parallel_steps) {
            return Err((
                "research.max_parallel_steps",
                "must be 1 to 100000".to_owned(),
            ));
        }
        Ok(())
    }
}

//! A run's event log and what is derived from it (pure: no I/O, no clock).
//!
//! Every event of a research run is one entry of the record store's log
//! `research_events`/`<session id>`, numbered from 1; that number is the SSE `id`. The log is
//! the run's only state: [`RunState::fold`] rebuilds everything (the plan, each task's status
//! and output, the groups done, the synthesis) from it, so a hub that restarts, or another hub
//! that takes the run over, continues from exactly what was recorded, and the `tasks`,
//! `executions` and memory-layer routes are views of the same fold.
//!
//! An entry is the JSON of [`RunEvent`]: `type` and `data` are what the SSE stream sends (the
//! research platform's `data: {"type", "data"}` events); `at_ms` and `x` (details the views
//! need, never streamed) stay inside the hub.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The kinds of events, in the order a run sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `{session_id, message}`.
    SessionStarted,
    /// `{tasks, message}`: the plan, as the `tasks` route shows its tasks.
    DecompositionComplete,
    /// `{group, tasks}` (`tasks`: how many).
    GroupStarted,
    /// `{task_id, agent_type, description}`.
    TaskStarted,
    /// `{task_id, message, progress}` (`progress`: the task's own percent).
    TaskProgress,
    /// `{task_id, agent_type, result, progress}` (`progress`: percent of the run's tasks ended).
    TaskCompleted,
    /// `{task_id, error, progress}`.
    TaskFailed,
    /// `{group}`.
    GroupCompleted,
    /// `{message}`.
    SynthesisStarted,
    /// `{synthesis}`.
    SynthesisComplete,
    /// `{session_id, total_tokens, duration_ms}`.
    SessionCompleted,
    /// `{error}`: the run failed and ends here.
    Error,
}

impl Kind {
    /// The wire name (`session_started`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SessionStarted => "session_started",
            Kind::DecompositionComplete => "decomposition_complete",
            Kind::GroupStarted => "group_started",
            Kind::TaskStarted => "task_started",
            Kind::TaskProgress => "task_progress",
            Kind::TaskCompleted => "task_completed",
            Kind::TaskFailed => "task_failed",
            Kind::GroupCompleted => "group_completed",
            Kind::SynthesisStarted => "synthesis_started",
            Kind::SynthesisComplete => "synthesis_complete",
            Kind::SessionCompleted => "session_completed",
            Kind::Error => "error",
        }
    }

    /// Whether the run ends with this event.
    pub fn is_terminal(self) -> bool {
        matches!(self, Kind::SessionCompleted | Kind::Error)
    }
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEvent {
    /// The event's kind (SSE: `type`).
    #[serde(rename = "type")]
    pub kind: Kind,
    /// What the SSE stream sends as `data`.
    pub data: Value,
    /// When it was recorded, Unix ms.
    pub at_ms: i64,
    /// Details for the views (never streamed); `null` when none.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub x: Value,
}

impl RunEvent {
    /// An event of `kind` with `data` and no details.
    pub fn new(kind: Kind, data: Value, at_ms: i64) -> Self {
        Self {
            kind,
            data,
            at_ms,
            x: Value::Null,
        }
    }

    /// The SSE `data` line: `{"type": …, "data": …}`.
    pub fn wire(&self) -> Value {
        json!({"type": self.kind.as_str(), "data": self.data})
    }
}

/// One research task of the plan, as `decomposition_complete` records it (and the `tasks`
/// route shows it, with its status and output from the fold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanTask {
    /// Its id (a UUID the hub gave it).
    pub id: String,
    /// What to do.
    pub description: String,
    /// The agent type that does it.
    pub assigned_agent: String,
    /// `high`, `medium` or `low`.
    pub priority: String,
    /// Ids of the tasks whose outputs it needs.
    pub dependencies: Vec<String>,
    /// Its position in the plan, from 0.
    pub execution_order: usize,
    /// Its execution group, from 0.
    pub execution_group: usize,
}

/// Where a research task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Not started.
    Pending,
    /// Started (its apex task submitted).
    Running,
    /// Ended with an output.
    Completed,
    /// Ended without one.
    Failed,
}

impl TaskState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
        }
    }
}

/// What the fold knows of one agent execution: a research task's, or the plan's and the
/// synthesis' (which have no research task).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Execution {
    /// The research task, if any.
    pub research_task_id: Option<String>,
    /// The agent type.
    pub agent_type: String,
    /// What it was asked.
    pub description: String,
    /// `running`, `completed` or `failed`.
    pub status: &'static str,
    /// Started, Unix ms.
    pub started_at_ms: i64,
    /// Ended, Unix ms.
    pub completed_at_ms: Option<i64>,
    /// `x` of the start event: `apex_task_id`, `agent_profile_id`, `agent_name`, `model`,
    /// `input_context`.
    pub start: Value,
    /// `x` of the end event: `structured`, `tokens_used`, `duration_ms`, `model_used`,
    /// `confidence`, `retry_count`.
    pub end: Value,
    /// The output text, when completed.
    pub output: Option<String>,
    /// The error, when failed.
    pub error: Option<String>,
}

/// A run, rebuilt from its log.
#[derive(Debug, Clone, Default)]
pub struct RunState {
    /// The last sequence number folded in.
    pub seq: u64,
    /// When `session_started` was recorded.
    pub started_at_ms: Option<i64>,
    /// The plan, once `decomposition_complete` is recorded.
    pub plan: Option<Vec<PlanTask>>,
    /// Each planned task's position in `plan`, by id.
    pub plan_index: std::collections::HashMap<String, usize>,
    /// How many planned tasks have ended (completed or failed).
    pub ended_count: usize,
    /// Each planned task's state, by id.
    pub state: BTreeMap<String, TaskState>,
    /// The latest `updated` time of each task, Unix ms.
    pub updated_ms: BTreeMap<String, i64>,
    /// The highest task-event number of each task's apex task seen in a `task_progress`
    /// (so a resumed run does not report the same progress twice).
    pub progress_seen: BTreeMap<String, u32>,
    /// Executions by key: a research task id, or `plan` / `synthesis`.
    pub executions: BTreeMap<String, Execution>,
    /// The order executions started in.
    pub execution_order: Vec<String>,
    /// Groups started and completed.
    pub groups_started: BTreeSet<usize>,
    /// A query run's search tools, as its retrieval stage's `group_started` recorded them.
    pub stage_tools: Vec<String>,
    /// Groups completed, with the digest each recorded.
    pub groups_completed: BTreeMap<usize, (String, i64)>,
    /// Whether `synthesis_started` is recorded.
    pub synthesis_started: bool,
    /// The synthesis, its key findings and open questions, and when.
    pub synthesis: Option<(String, Vec<String>, Vec<String>, i64)>,
    /// The terminal event, if the run ended.
    pub ended: Option<Kind>,
    /// The error of an `error` event.
    pub error: Option<String>,
    /// Tokens of every execution so far.
    pub total_tokens: u64,
}

fn str_of(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_owned()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

impl RunState {
    /// The state after `events` (in log order, `(seq, event)`), folded into `self`.
    pub fn apply(&mut self, seq: u64, e: &RunEvent) {
        self.seq = seq;
        let task_id = str_of(&e.data, "task_id");
        match e.kind {
            Kind::SessionStarted => self.started_at_ms = Some(e.at_ms),
            Kind::DecompositionComplete => {
                let plan: Vec<PlanTask> =
                    serde_json::from_value(e.data.get("tasks").cloned().unwrap_or(Value::Null))
                        .unwrap_or_default();
                for (i, t) in plan.iter().enumerate() {
                    self.state.insert(t.id.clone(), TaskState::Pending);
                    self.updated_ms.insert(t.id.clone(), e.at_ms);
                    self.plan_index.insert(t.id.clone(), i);
                }
                // The coordinator's execution: started before the event, recorded with it.
                let started =
                    e.x.get("started_at_ms")
                        .and_then(Value::as_i64)
                        .unwrap_or(e.at_ms);
                self.start_execution(
                    "plan",
                    "meta_coordinator".into(),
                    "decompose the task".into(),
                    e,
                );
                if let Some(x) = self.executions.get_mut("plan") {
                    x.started_at_ms = started;
                }
                let raw = e.x.get("raw").and_then(Value::as_str).map(str::to_owned);
                self.end_execution("plan", e, raw, None);
                self.plan = Some(plan);
            }
            Kind::GroupStarted => {
                if let Some(g) = e.data.get("group").and_then(Value::as_u64) {
                    self.groups_started.insert(g as usize);
                }
                if let Some(t) = e.data.get("tools") {
                    self.stage_tools = strings(t);
                }
            }
            Kind::TaskStarted => {
                self.state.insert(task_id.clone(), TaskState::Running);
                self.updated_ms.insert(task_id.clone(), e.at_ms);
                let description = str_of(&e.data, "description");
                let agent_type = str_of(&e.data, "agent_type");
                self.start_execution(&task_id, agent_type, description, e);
            }
            Kind::TaskProgress => {
                if let Some(s) = e.x.get("task_seq").and_then(Value::as_u64) {
                    let seen = self.progress_seen.entry(task_id.clone()).or_default();
                    *seen = (*seen).max(s as u32);
                }
                self.updated_ms.insert(task_id, e.at_ms);
            }
            Kind::TaskCompleted => {
                self.count_end(&task_id);
                self.state.insert(task_id.clone(), TaskState::Completed);
                self.updated_ms.insert(task_id.clone(), e.at_ms);
                let result = str_of(&e.data, "result");
                self.end_execution(&task_id, e, Some(result), None);
            }
            Kind::TaskFailed => {
                self.count_end(&task_id);
                self.state.insert(task_id.clone(), TaskState::Failed);
                self.updated_ms.insert(task_id.clone(), e.at_ms);
                let error = str_of(&e.data, "error");
                self.end_execution(&task_id, e, None, Some(error));
            }
            Kind::GroupCompleted => {
                if let Some(g) = e.data.get("group").and_then(Value::as_u64) {
                    self.groups_completed
                        .insert(g as usize, (str_of(&e.x, "digest"), e.at_ms));
                }
            }
            Kind::SynthesisStarted => {
                self.synthesis_started = true;
                self.start_execution(
                    "synthesis",
                    "synthesizer".into(),
                    "synthesize the findings".into(),
                    e,
                );
            }
            Kind::SynthesisComplete => {
                let s = str_of(&e.data, "synthesis");
                self.synthesis = Some((
                    s.clone(),
                    strings(&e.x["key_findings"]),
                    strings(&e.x["open_questions"]),
                    e.at_ms,
                ));
                self.end_execution("synthesis", e, Some(s), None);
            }
            Kind::SessionCompleted => self.ended = Some(Kind::SessionCompleted),
            Kind::Error => {
                self.ended = Some(Kind::Error);
                self.error = Some(str_of(&e.data, "error"));
                // An execution still running when the run failed failed with it.
                for x in self.executions.values_mut() {
                    if x.status == "running" {
                        x.status = "failed";
                        x.completed_at_ms = Some(e.at_ms);
                        x.error = self.error.clone();
                    }
                }
            }
        }
    }

    /// Folds a whole log.
    pub fn fold<'a>(events: impl IntoIterator<Item = (u64, &'a RunEvent)>) -> RunState {
        let mut s = RunState::default();
        for (seq, e) in events {
            s.apply(seq, e);
        }
        s
    }

    fn start_execution(
        &mut self,
        key: &str,
        agent_type: String,
        description: String,
        e: &RunEvent,
    ) {
        if !self.executions.contains_key(key) {
            self.execution_order.push(key.to_owned());
        }
        self.executions.insert(
            key.to_owned(),
            Execution {
                research_task_id: (key != "plan" && key != "synthesis").then(|| key.to_owned()),
                agent_type,
                description,
                status: "running",
                started_at_ms: e.at_ms,
                start: e.x.clone(),
                ..Execution::default()
            },
        );
    }

    fn end_execution(
        &mut self,
        key: &str,
        e: &RunEvent,
        output: Option<String>,
        error: Option<String>,
    ) {
        self.total_tokens += e.x.get("tokens_used").and_then(Value::as_u64).unwrap_or(0);
        let Some(x) = self.executions.get_mut(key) else {
            return;
        };
        x.status = if error.is_some() {
            "failed"
        } else {
            "completed"
        };
        x.completed_at_ms = Some(e.at_ms);
        x.end = e.x.clone();
        x.output = output;
        x.error = error;
    }

    /// Counts a planned task's first end.
    fn count_end(&mut self, id: &str) {
        if matches!(
            self.state.get(id),
            Some(TaskState::Pending | TaskState::Running)
        ) {
            self.ended_count += 1;
        }
    }

    /// How many planned tasks have ended (completed or failed).
    pub fn ended_tasks(&self) -> usize {
        self.ended_count
    }

    /// The planned task `id`.
    pub fn planned(&self, id: &str) -> Option<&PlanTask> {
        let i = *self.plan_index.get(id)?;
        self.plan.as_ref()?.get(i)
    }

    /// Percent of the planned tasks that have ended (0 before the plan; 100 once ended).
    pub fn progress(&self) -> u32 {
        if self.ended == Some(Kind::SessionCompleted) {
            return 100;
        }
        match self.plan.as_ref().map(Vec::len) {
            None | Some(0) => 0,
            Some(n) => (self.ended_tasks() * 100 / n) as u32,
        }
    }

    /// The stage a run is at: `created`, `decomposition`, `execution` or `synthesis` (a
    /// completed run stays at `synthesis`, its last stage).
    pub fn stage(&self) -> &'static str {
        if self.synthesis_started {
            "synthesis"
        } else if self.plan.is_some() {
            "execution"
        } else if self.started_at_ms.is_some() {
            "decomposition"
        } else {
            "created"
        }
    }

    /// The output of the completed task `id`.
    pub fn output(&self, id: &str) -> Option<&str> {
        self.executions
            .get(id)
            .filter(|x| x.status == "completed")
            .and_then(|x| x.output.as_deref())
    }
}

/// One file of a session's memory layers (virtual: rendered from the fold).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFile {
    /// `L0`, `L1` or `L2`.
    pub layer: &'static str,
    /// The path under the session's workspace (`L0/explorer/output.md`).
    pub rel: String,
    /// Its content (Markdown).
    pub content: String,
    /// Last change, Unix ms.
    pub modified_ms: i64,
}

/// The memory layers of a run: L0 each agent's raw output (`L0/<agent>/output.md`, one
/// section per task it did), L1 each group's digest (`L1/group_<n>.md`), L2 the synthesis
/// (`L2/key_findings.md`, `L2/open_questions.md`, `L2/synthesis.md`).
pub fn layer_files(s: &RunState) -> Vec<LayerFile> {
    let mut files = Vec::new();
    let mut by_agent: BTreeMap<&str, (String, i64)> = BTreeMap::new();
    if let Some(plan) = &s.plan {
        for t in plan {
            let Some(x) = s.executions.get(&t.id) else {
                continue;
            };
            let Some(out) = x.output.as_deref().filter(|_| x.status == "completed") else {
                continue;
            };
            let e = by_agent.entry(t.assigned_agent.as_str()).or_default();
            e.0.push_str(&format!("## {}\n\n{}\n\n", t.description, out.trim()));
            e.1 = e.1.max(x.completed_at_ms.unwrap_or(0));
        }
    }
    for (agent, (content, at)) in by_agent {
        files.push(LayerFile {
            layer: "L0",
            rel: format!("L0/{agent}/output.md"),
            content,
            modified_ms: at,
        });
    }
    for (g, (digest, at)) in &s.groups_completed {
        files.push(LayerFile {
            layer: "L1",
            rel: format!("L1/group_{g}.md"),
            content: digest.clone(),
            modified_ms: *at,
        });
    }
    if let Some((synthesis, findings, questions, at)) = &s.synthesis {
        let list = |title: &str, items: &[String]| {
            let mut t = format!("# {title}\n\n");
            for (i, f) in items.iter().enumerate() {
                t.push_str(&format!("{}. {f}\n", i + 1));
            }
            t
        };
        files.push(LayerFile {
            layer: "L2",
            rel: "L2/key_findings.md".to_owned(),
            content: list("Key Findings", findings),
            modified_ms: *at,
        });
        files.push(LayerFile {
            layer: "L2",
            rel: "L2/open_questions.md".to_owned(),
            content: list("Open Questions", questions),
            modified_ms: *at,
        });
        files.push(LayerFile {
            layer: "L2",
            rel: "L2/synthesis.md".to_owned(),
            content: format!("# Synthesis\n\n{}\n", synthesis.trim()),
            modified_ms: *at,
        });
    }
    files
}

/// The digest of a finished group (its L1 file): each task's key findings, or the start of
/// its output when it reported none.
pub fn digest(group: usize, s: &RunState) -> String {
    let mut d = format!("# Group {group} digest\n\n");
    let Some(plan) = &s.plan else {
        return d;
    };
    let members: Vec<&PlanTask> = plan.iter().filter(|t| t.execution_group == group).collect();
    for t in members.iter().take(DIGEST_TASKS) {
        d.push_str(&format!("## {} ({})\n\n", t.description, t.assigned_agent));
        match s.executions.get(&t.id) {
            Some(x) if x.status == "completed" => {
                let findings = strings(&x.end["structured"]["key_findings"]);
                if findings.is_empty() {
                    let out = x.output.as_deref().unwrap_or("");
                    let short: String = out.chars().take(400).collect();
                    d.push_str(&format!("{}\n\n", short.trim()));
                } else {
                    for f in findings {
                        d.push_str(&format!("- {f}\n"));
                    }
                    d.push('\n');
                }
            }
            Some(x) => d.push_str(&format!(
                "Failed: {}\n\n",
                x.error.as_deref().unwrap_or("no output")
            )),
            None => d.push_str("Not run.\n\n"),
        }
    }
    if members.len() > DIGEST_TASKS {
        d.push_str(&format!(
            "… and {} more tasks.\n",
            members.len() - DIGEST_TASKS
        ));
    }
    d
}

/// Most tasks a group digest describes.
pub const DIGEST_TASKS: usize = 200;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ev(kind: Kind, data: Value, x: Value) -> RunEvent {
        RunEvent {
            kind,
            data,
            at_ms: 1_000,
            x,
        }
    }

    fn plan_event() -> RunEvent {
        let tasks = json!([
            {"id": "a", "description": "find", "assigned_agent": "explorer", "priority": "high",
             "dependencies": [], "execution_order": 0, "execution_group": 0},
            {"id": "b", "description": "judge", "assigned_agent": "critic", "priority": "medium",
             "dependencies": ["a"], "execution_order": 1, "execution_group": 1},
        ]);
        ev(
            Kind::DecompositionComplete,
            json!({"tasks": tasks, "message": "ok"}),
            json!({"tokens_used": 7}),
        )
    }

    #[test]
    fn the_fold_tracks_tasks_groups_tokens_and_the_end() {
        let log = [
            ev(
                Kind::SessionStarted,
                json!({"session_id": "s"}),
                Value::Null,
            ),
            plan_event(),
            ev(
                Kind::GroupStarted,
                json!({"group": 0, "tasks": 1}),
                Value::Null,
            ),
            ev(
                Kind::TaskStarted,
                json!({"task_id": "a", "agent_type": "explorer", "description": "find"}),
                json!({"apex_task_id": "t1"}),
            ),
            ev(
                Kind::TaskProgress,
                json!({"task_id": "a", "message": "m", "progress": 50}),
                json!({"task_seq": 4}),
            ),
            ev(
                Kind::TaskCompleted,
                json!({"task_id": "a", "agent_type": "explorer", "result": "found", "progress": 50}),
                json!({"tokens_used": 10, "structured": {"key_findings": ["k1"]}}),
            ),
            ev(
                Kind::GroupCompleted,
                json!({"group": 0}),
                json!({"digest": "d0"}),
            ),
        ];
        let s = RunState::fold(log.iter().enumerate().map(|(i, e)| (i as u64 + 1, e)));
        assert_eq!(s.seq, 7);
        assert_eq!(s.stage(), "execution");
        assert_eq!(s.state["a"], TaskState::Completed);
        assert_eq!(s.state["b"], TaskState::Pending);
        assert_eq!(s.progress(), 50);
        assert_eq!(s.total_tokens, 17);
        assert_eq!(s.progress_seen["a"], 4);
        assert_eq!(s.output("a"), Some("found"));
        assert_eq!(s.execution_order, vec!["plan", "a"]);
        assert!(s.ended.is_none());
        let d = digest(0, &s);
        assert!(d.contains("- k1"), "{d}");
        let files = layer_files(&s);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].rel, "L0/explorer/output.md");
        assert!(files[0].content.contains("found"));
        assert_eq!(files[1].rel, "L1/group_0.md");
    }

    #[test]
    fn an_error_fails_what_was_running_and_ends_the_run() {
        let log = [
            ev(Kind::SessionStarted, json!({}), Value::Null),
            plan_event(),
            ev(
                Kind::TaskStarted,
                json!({"task_id": "a", "agent_type": "explorer", "description": "find"}),
                Value::Null,
            ),
            ev(Kind::Error, json!({"error": "boom"}), Value::Null),
        ];
        let s = RunState::fold(log.iter().enumerate().map(|(i, e)| (i as u64 + 1, e)));
        assert_eq!(s.ended, Some(Kind::Error));
        assert_eq!(s.executions["a"].status, "failed");
        assert_eq!(s.executions["a"].error.as_deref(), Some("boom"));
    }

    #[test]
    fn events_go_out_as_type_and_data_only() {
        let e = ev(
            Kind::GroupStarted,
            json!({"group": 1, "tasks": 2}),
            json!({"secret": 1}),
        );
        assert_eq!(
            e.wire(),
            json!({"type": "group_started", "data": {"group": 1, "tasks": 2}})
        );
        let stored: RunEvent = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(stored, e);
    }
}

//! What the driver sends to agent steps and reads back: following a step's apex task, the
//! `agent.run` arguments, the coordinator's plan (its schema and parsing), and the details of
//! a finished step the views show.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Agent;
use super::Research;
use super::run::Msg;
use crate::model::{EventKind, Task};
use crate::principal::Principal;
use crate::tasks::MAX_WAIT;

/// Follows one agent step's apex task: progress events after `progress_after` (none when
/// `None`), then its end.
pub(super) async fn watch(
    r: Research,
    owner: Principal,
    key: String,
    task_id: String,
    progress_after: Option<u32>,
    tx: mpsc::Sender<Msg>,
) {
    if let Some(after) = progress_after
        && let Ok(Some(mut events)) = r.inner.tasks.events(&owner, &task_id, after).await
    {
        loop {
            let e = tokio::select! {
                e = events.recv() => e,
                _ = tx.closed() => return,
            };
            let Some(e) = e else { break };
            if e.kind == EventKind::TaskProgress {
                let m = Msg::Progress {
                    key: key.clone(),
                    seq: e.seq,
                    progress: e.progress.unwrap_or(0.0),
                    message: e.message.clone().unwrap_or_default(),
                };
                if tx.send(m).await.is_err() {
                    return;
                }
            }
            if e.status.is_terminal() {
                break;
            }
        }
    }
    let mut shutdown = r.inner.shutdown.clone();
    loop {
        let got = tokio::select! {
            g = r.inner.tasks.get(&owner, &task_id, MAX_WAIT) => g,
            _ = tx.closed() => return,
        };
        match got {
            Ok(Some(t)) if t.status.is_terminal() => {
                let _ = tx
                    .send(Msg::Done {
                        key,
                        task: Box::new(t),
                    })
                    .await;
                return;
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                let _ = tx
                    .send(Msg::Gone {
                        key,
                        error: format!("the agent task {task_id} is gone"),
                    })
                    .await;
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
        if *shutdown.borrow_and_update() || tx.is_closed() {
            return;
        }
    }
}

/// The `agent.run` arguments of `agent` doing `task` with `inputs`.
pub(super) fn run_args(
    agent: &Agent,
    task: &str,
    inputs: Vec<Value>,
    schema: Option<Value>,
) -> Value {
    let mut args = agent.args.clone();
    args.insert("task".to_owned(), json!(task));
    if !inputs.is_empty() {
        args.insert("inputs".to_owned(), Value::Array(inputs));
    }
    if let Some(s) = schema {
        args.insert("response_format".to_owned(), s);
    }
    Value::Object(args)
}

/// The JSON Schema of the coordinator's plan: positions for dependencies (models keep them
/// straight more easily than invented ids), agent types from the roster.
pub fn plan_schema(assignable: &[String], max: usize) -> Value {
    json!({
        "type": "object",
        "properties": {
            "tasks": {
                "type": "array",
                "maxItems": max,
                "items": {
                    "type": "object",
                    "properties": {
                        "description": {"type": "string"},
                        "assigned_agent": {"type": "string", "enum": assignable},
                        "priority": {"type": "string", "enum": ["high", "medium", "low"]},
                        "dependencies": {"type": "array", "items": {"type": "integer", "minimum": 0}}
                    },
                    "required": ["description", "assigned_agent", "priority", "dependencies"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["tasks"],
        "additionalProperties": false
    })
}

/// One task as the coordinator planned it: `(description, agent type, priority,
/// dependencies)`.
pub(super) type Planned = (String, String, String, Vec<String>);

/// `(description, agent type, priority, dependencies)` of each planned task, from the
/// `agent.run` result (`structured`, else `result` parsed as JSON). Unknown agent types become
/// the first assignable one; a plan longer than `max` is cut.
pub(super) fn parse_plan(
    result: &Value,
    assignable: &[String],
    max: usize,
) -> Option<Vec<Planned>> {
    let parsed;
    let plan = match result.get("structured").filter(|s| s.is_object()) {
        Some(s) => s,
        None => {
            let text = result.get("result").and_then(Value::as_str)?;
            parsed = serde_json::from_str::<Value>(extract_json(text)).ok()?;
            &parsed
        }
    };
    let tasks = plan.get("tasks")?.as_array()?;
    let fallback = assignable
        .first()
        .cloned()
        .unwrap_or_else(|| "explorer".to_owned());
    Some(
        tasks
            .iter()
            .take(max)
            .map(|t| {
                let description = t
                    .get("description")
                    .and_then(Value::as_str)
                    .filter(|d| !d.trim().is_empty())
                    .unwrap_or("(no description)")
                    .to_owned();
                let agent = t
                    .get("assigned_agent")
                    .and_then(Value::as_str)
                    .filter(|a| assignable.iter().any(|x| x == a))
                    .map_or_else(|| fallback.clone(), str::to_owned);
                let priority = t
                    .get("priority")
                    .and_then(Value::as_str)
                    .filter(|p| ["high", "medium", "low"].contains(p))
                    .unwrap_or("medium")
                    .to_owned();
                let deps = t
                    .get("dependencies")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|d| match d {
                                Value::Number(n) => Some(n.to_string()),
                                Value::String(s) => Some(s.clone()),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (description, agent, priority, deps)
            })
            .collect(),
    )
}

/// The JSON inside a Markdown code fence, or the text as is.
pub(super) fn extract_json(text: &str) -> &str {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("```") {
        let body = rest.split_once('\n').map_or(rest, |(_, b)| b);
        return body.rsplit_once("```").map_or(body, |(b, _)| b).trim();
    }
    t
}

/// What the views need of a finished step.
pub(super) fn step_details(t: &Task, result: &Value) -> Value {
    json!({
        "apex_task_id": t.id,
        "structured": result.get("structured").cloned().unwrap_or(Value::Null),
        "tokens_used": result.get("tokens_used").and_then(Value::as_u64).unwrap_or(0),
        "duration_ms": result.get("duration_ms").cloned().unwrap_or(Value::Null),
        "model_used": result.get("model_used").cloned().unwrap_or(Value::Null),
        "confidence": result.get("confidence").cloned().unwrap_or(Value::Null),
        "retry_count": t.attempt.saturating_sub(1),
        "node_id": t.node_id,
    })
}

/// The text of an `agent.run` result.
pub(super) fn result_text(result: &Value) -> String {
    match result.get("result") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

pub(super) fn task_error(t: &Task) -> String {
    match &t.error {
        Some(e) => format!("{} ({})", e.message, e.code),
        None => format!("the agent task ended {}", t.status.as_str()),
    }
}

pub(super) fn priority_of(p: &str) -> i32 {
    match p {
        "high" => 2,
        "low" => 0,
        _ => 1,
    }
}

pub(super) fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn types() -> Vec<String> {
        vec!["explorer".to_owned(), "critic".to_owned()]
    }

    #[test]
    fn a_plan_is_read_from_structured_output_or_fenced_json() {
        let structured = json!({"structured": {"tasks": [
            {"description": "find", "assigned_agent": "explorer", "priority": "high", "dependencies": []},
            {"description": "judge", "assigned_agent": "nobody", "priority": "urgent", "dependencies": [0, "x"]},
        ]}});
        let p = parse_plan(&structured, &types(), 10).unwrap();
        assert_eq!(
            p[0],
            ("find".into(), "explorer".into(), "high".into(), vec![])
        );
        assert_eq!(
            p[1],
            (
                "judge".into(),
                "explorer".into(),
                "medium".into(),
                vec!["0".into(), "x".into()]
            )
        );
        let fenced = json!({"result": "```json\n{\"tasks\": [{\"description\": \"a\"}]}\n```", "structured": null});
        assert_eq!(parse_plan(&fenced, &types(), 10).unwrap().len(), 1);
        assert!(parse_plan(&json!({"result": "no plan here"}), &types(), 10).is_none());
        let long = json!({"structured": {"tasks": vec![json!({"description": "x"}); 30]}});
        assert_eq!(parse_plan(&long, &types(), 12).unwrap().len(), 12);
    }

    #[test]
    fn the_plan_schema_names_the_roster() {
        let s = plan_schema(&types(), 5);
        assert_eq!(s["properties"]["tasks"]["maxItems"], 5);
        assert_eq!(
            s["properties"]["tasks"]["items"]["properties"]["assigned_agent"]["enum"],
            json!(["explorer", "critic"])
        );
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("héllo", 2), "hé…");
        assert_eq!(cut("hi", 5), "hi");
    }
}

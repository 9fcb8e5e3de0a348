//! The knowledge platform's plan-executor query (`POST /api/v2/query`), run on the research
//! engine: a run of mode `query` whose groups are the three stages `planning`, `retrieval`
//! and `summary`, its events in the same log as a research run's, and [`plan_executor`] the
//! rendering of them in the platform's `{event_type, context: {mode: "plan-executor", …},
//! messages}` format.
//!
//! - **planning** (group 0): the `planner` agent answers a structured output `{thinking,
//!   queries}` (an `agent.run` task); its thinking is a `STREAM_THING`.
//! - **retrieval** (group 1): for the question and each of the planner's queries (at most
//!   [`MAX_QUERIES`] in all), a search of the owner's memory (conversations and saved
//!   memories; `SEARCH`), and a call of every online search tool (a plugin with the `search`
//!   capability, called `{query, limit}` as a task of the owner; `TOOL_CALL`). Each is an
//!   `INVOCATION_DECLARED` / `INVOCATION_CHANGE` pair; their references, deduplicated by
//!   source, become the `reference_list` artifact.
//! - **summary** (group 2): the `writer` agent answers from the references; its answer goes
//!   out as `ARTIFACT_CHANGE` appends of the `summary_report` artifact, then
//!   `STREAM_CONTENT`.
//!
//! A failure ends the stream with a `STREAM_THING` whose content starts with `❌ 错误: `, then
//! `END`.

use serde_json::{Value, json};

use super::log::{Kind, RunEvent};
use super::now_ms;
use super::run::{Driver, Stop};

/// Most searches of the retrieval stage's memory and each tool (the question and the
/// planner's queries).
pub const MAX_QUERIES: usize = 3;
/// Most references kept for the summary.
pub const MAX_REFERENCES: usize = 20;
/// Words per `ARTIFACT_CHANGE` append of the summary.
const WORDS_PER_APPEND: usize = 12;

/// The stages, in order: `(id, name)`.
pub const STAGES: [(&str, &str); 3] = [
    ("planning", "规划"),
    ("retrieval", "检索"),
    ("summary", "总结"),
];

/// The JSON Schema the planner answers.
fn planner_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "thinking": {"type": "string"},
            "queries": {"type": "array", "maxItems": MAX_QUERIES, "items": {"type": "string"}}
        },
        "required": ["thinking", "queries"],
        "additionalProperties": false
    })
}

fn message(event_type: &str, context: Value, messages: Value) -> Value {
    let mut ctx = json!({"mode": "plan-executor"});
    if let (Some(c), Some(extra)) = (ctx.as_object_mut(), context.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    json!({"event_type": event_type, "context": ctx, "messages": messages})
}

/// The plan-executor messages of one stored event of a query run (none for events that
/// have no rendering, such as the start of an agent step).
pub fn plan_executor(e: &RunEvent) -> Vec<Value> {
    let d = &e.data;
    let stage = d.get("stage").and_then(Value::as_str).unwrap_or("");
    let task = d.get("task_id").and_then(Value::as_str).unwrap_or("");
    match e.kind {
        Kind::SessionStarted => {
            let stages: Vec<Value> = STAGES
                .iter()
                .map(|(id, name)| json!({"id": id, "name": name, "status": "PENDING"}))
                .collect();
            vec![message(
                "PLAN_DECLARED",
                json!({}),
                json!([{"stages": stages}]),
            )]
        }
        Kind::GroupStarted => {
            let mut out = vec![message(
                "PLAN_CHANGE",
                json!({"stage_id": stage}),
                json!([{"status": "RUNNING"}]),
            )];
            if stage == "summary" {
                out.push(message(
                    "ARTIFACT_DECLARED",
                    json!({"artifact_id": d["artifact_id"], "stage_id": "summary"}),
                    json!([{"scope": "STAGE", "data_type": "FILE", "source": "summary",
                            "artifact_name": "Summary", "artifact_type": "summary_report",
                            "content": ""}]),
                ));
            }
            out
        }
        Kind::TaskStarted if stage == "retrieval" => vec![message(
            "INVOCATION_DECLARED",
            json!({"stage_id": "retrieval", "invocation_id": task}),
            json!([{"name": d["description"], "invocation_type": d["invocation_type"]}]),
        )],
        Kind::TaskCompleted if stage == "retrieval" => vec![message(
            "INVOCATION_CHANGE",
            json!({"stage_id": "retrieval", "invocation_id": task}),
            json!([{"status": "COMPLETED", "content": d["result"]}]),
        )],
        Kind::TaskFailed if stage == "retrieval" => vec![message(
            "INVOCATION_CHANGE",
            json!({"stage_id": "retrieval", "invocation_id": task}),
            json!([{"status": "FAILED", "content": d["error"]}]),
        )],
        Kind::TaskCompleted if stage == "planning" => vec![message(
            "STREAM_THING",
            json!({}),
            json!([{"content": d["result"]}]),
        )],
        Kind::TaskCompleted if stage == "summary" => {
            let text = d["result"].as_str().unwrap_or("");
            let artifact = &d["artifact_id"];
            let words: Vec<&str> = text.split_inclusive(char::is_whitespace).collect();
            let mut out: Vec<Value> = words
                .chunks(WORDS_PER_APPEND)
                .map(|piece| {
                    message(
                        "ARTIFACT_CHANGE",
                        json!({"artifact_id": artifact, "stage_id": "summary"}),
                        json!([{"scope": "STAGE", "change_type": "CONTENT_APPEND",
                                "data_type": "FILE", "content": piece.concat()}]),
                    )
                })
                .collect();
            out.push(message(
                "STREAM_CONTENT",
                json!({}),
                json!([{"content": text}]),
            ));
            out
        }
        Kind::GroupCompleted => {
            let mut out = vec![message(
                "PLAN_CHANGE",
                json!({"stage_id": stage}),
                json!([{"status": "COMPLETED"}]),
            )];
            if stage == "retrieval" {
                let refs = d.get("references").cloned().unwrap_or_else(|| json!([]));
                let artifact = &d["artifact_id"];
                out.push(message(
                    "ARTIFACT_DECLARED",
                    json!({"artifact_id": artifact, "stage_id": "summary"}),
                    json!([{"scope": "STAGE", "data_type": "STRUCTURED", "source": "retrieval",
                            "artifact_name": "References", "artifact_type": "reference_list",
                            "content": ""}]),
                ));
                out.push(message(
                    "ARTIFACT_CHANGE",
                    json!({"artifact_id": artifact, "stage_id": "summary"}),
                    json!([{"scope": "STAGE", "change_type": "CONTENT_REPLACE",
                            "data_type": "STRUCTURED", "content": refs.to_string()}]),
                ));
            }
            out
        }
        Kind::Error => vec![
            message(
                "STREAM_THING",
                json!({}),
                json!([{"content": format!("❌ 错误: {}", d["error"].as_str().unwrap_or(""))}]),
            ),
            message("END", json!({}), json!([])),
        ],
        Kind::SessionCompleted => vec![message("END", json!({}), json!([]))],
        _ => Vec::new(),
    }
}

/// One reference of the retrieval stage.
fn reference(title: &str, source: &str, snippet: &str) -> Value {
    json!({"title": title, "source": source, "snippet": snippet})
}

impl Driver {
    /// The query run: planning, retrieval, summary (each skipped when the log shows it done).
    pub(super) async fn run_query(&mut self) -> Result<(), Stop> {
        if self.state.ended.is_some() {
            return Ok(());
        }
        if self.state.started_at_ms.is_none() {
            let e = RunEvent::new(
                Kind::SessionStarted,
                json!({"session_id": self.id, "message": "Query started"}),
                now_ms(),
            );
            self.append(vec![e]).await?;
        }
        let queries = match self.planning().await? {
            Ok(q) => q,
            Err(m) => return self.fail(m).await,
        };
        let references = self.retrieval(&queries).await?;
        if let Err(m) = self.summary(&references).await? {
            return self.fail(m).await;
        }
        let e = RunEvent::new(
            Kind::SessionCompleted,
            json!({"session_id": self.id, "total_tokens": self.state.total_tokens,
                   "duration_ms": (now_ms() - self.started_ms).max(0)}),
            now_ms(),
        );
        self.end(e).await
    }

    async fn stage_started(&mut self, g: usize, extra: Value) -> Result<(), Stop> {
        if self.state.groups_started.contains(&g) {
            return Ok(());
        }
        let mut data = json!({"group": g, "stage": STAGES[g].0, "tasks": 1});
        if let (Some(d), Some(x)) = (data.as_object_mut(), extra.as_object()) {
            for (k, v) in x {
                d.insert(k.clone(), v.clone());
            }
        }
        self.append(vec![RunEvent::new(Kind::GroupStarted, data, now_ms())])
            .await
    }

    /// The searches to run: the question, then the planner's queries.
    async fn planning(&mut self) -> Result<Result<Vec<String>, String>, Stop> {
        let question = self.task.clone();
        if let Some(x) = self.state.executions.get("planning")
            && x.status == "completed"
        {
            return Ok(Ok(searches(&question, &x.end["structured"])));
        }
        self.stage_started(0, Value::Null).await?;
        let Some(planner) = self.agent("planner").await? else {
            return Ok(Err("no planner agent is available".to_owned()));
        };
        if !self.state.executions.contains_key("planning") {
            let started = RunEvent {
                kind: Kind::TaskStarted,
                data: json!({"task_id": "planning", "stage": "planning", "agent_type": "planner",
                             "description": "plan the searches"}),
                at_ms: now_ms(),
                x: json!({"agent_name": planner.name, "agent_profile_id": planner.profile_id}),
            };
            self.append(vec![started]).await?;
        }
        let task = format!(
            "Plan how to answer this question from a knowledge base. Think it through \
             briefly (thinking), then give up to {} search queries (queries).\n\nQuestion: \
             {question}",
            MAX_QUERIES - 1
        );
        let t = match self
            .step(
                "planning",
                &planner,
                task,
                Vec::new(),
                Some(planner_schema()),
            )
            .await?
        {
            Ok(t) if t.status == crate::model::TaskStatus::Succeeded => t,
            Ok(t) => {
                return Ok(Err(format!(
                    "planning failed: {}",
                    super::steps::task_error(&t)
                )));
            }
            Err(e) => return Ok(Err(format!("planning failed: {e}"))),
        };
        let result = t.result.clone().unwrap_or(Value::Null);
        let structured = result.get("structured").cloned().unwrap_or(Value::Null);
        let thinking = structured
            .get("thinking")
            .and_then(Value::as_str)
            .map_or_else(|| super::steps::result_text(&result), str::to_owned);
        let done = RunEvent {
            kind: Kind::TaskCompleted,
            data: json!({"task_id": "planning", "stage": "planning", "agent_type": "planner",
                         "result": thinking, "progress": 33}),
            at_ms: now_ms(),
            x: super::steps::step_details(&t, &result),
        };
        let group = RunEvent::new(
            Kind::GroupCompleted,
            json!({"group": 0, "stage": "planning"}),
            now_ms(),
        );
        self.append(vec![done, group]).await?;
        Ok(Ok(searches(&question, &structured)))
    }

    /// Runs every search, once each (an invocation already recorded as ended is not run
    /// again), and returns the references.
    async fn retrieval(&mut self, queries: &[String]) -> Result<Vec<Value>, Stop> {
        if let Some((_, _)) = self.state.groups_completed.get(&1) {
            return Ok(self.recorded_references());
        }
        // The search tools are fixed when the stage starts (recorded with it), so a resumed
        // run calls the same ones whatever nodes came or went.
        let tools: Vec<String> = match self.state.groups_started.contains(&1) {
            true => self.state.stage_tools.clone(),
            false => {
                let views = self.r.inner.tasks.node_views().await.unwrap_or_default();
                crate::plugins::search_tools(&views)
            }
        };
        self.stage_started(1, json!({"tools": tools})).await?;
        for (qi, q) in queries.iter().enumerate() {
            self.invoke(format!("inv_{qi}_memory"), q, None).await?;
            for tool in &tools {
                self.invoke(format!("inv_{qi}_{tool}"), q, Some(tool))
                    .await?;
            }
        }
        let references = self.recorded_references();
        let group = RunEvent::new(
            Kind::GroupCompleted,
            json!({"group": 1, "stage": "retrieval", "references": references,
                   "artifact_id": format!("references-{}", self.id)}),
            now_ms(),
        );
        self.append(vec![group]).await?;
        Ok(references)
    }

    /// The references the ended invocations recorded, deduplicated by source.
    fn recorded_references(&self) -> Vec<Value> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for k in &self.state.execution_order {
            let Some(x) = self.state.executions.get(k) else {
                continue;
            };
            for r in x.end["references"].as_array().into_iter().flatten() {
                let source = r["source"].as_str().unwrap_or("").to_owned();
                if out.len() < MAX_REFERENCES && seen.insert(source) {
                    out.push(r.clone());
                }
            }
        }
        out
    }

    /// One search: of memory (`tool` `None`) or with a search tool.
    async fn invoke(&mut self, key: String, query: &str, tool: Option<&str>) -> Result<(), Stop> {
        if let Some(x) = self.state.executions.get(&key)
            && x.status != "running"
        {
            return Ok(());
        }
        let (kind, name) = match tool {
            None => ("SEARCH", format!("Searching memory: {query}")),
            Some(t) => ("TOOL_CALL", format!("Calling {t}: {query}")),
        };
        if !self.state.executions.contains_key(&key) {
            let started = RunEvent {
                kind: Kind::TaskStarted,
                data: json!({"task_id": key, "stage": "retrieval", "agent_type": "retrieval",
                             "description": name, "invocation_type": kind}),
                at_ms: now_ms(),
                x: Value::Null,
            };
            self.append(vec![started]).await?;
        }
        let outcome = match tool {
            None => self.search_memory(query).await,
            Some(t) => self.search_tool(&key, t, query).await?,
        };
        let ended = match outcome {
            Ok(references) => RunEvent {
                kind: Kind::TaskCompleted,
                data: json!({"task_id": key, "stage": "retrieval", "agent_type": "retrieval",
                             "result": json!({"success": true, "doc_count": references.len()}).to_string(),
                             "progress": 66}),
                at_ms: now_ms(),
                x: json!({"references": references}),
            },
            Err(error) => RunEvent {
                kind: Kind::TaskFailed,
                data: json!({"task_id": key, "stage": "retrieval", "error": error, "progress": 66}),
                at_ms: now_ms(),
                x: Value::Null,
            },
        };
        self.append(vec![ended]).await
    }

    async fn search_memory(&self, query: &str) -> Result<Vec<Value>, String> {
        let Some(memory) = &self.r.inner.memory else {
            return Ok(Vec::new());
        };
        let q = crate::memory::Query {
            query: query.chars().take(1000).collect(),
            session_id: None,
            limit: Some(5),
            since_ms: None,
        };
        match memory.query(&self.owner, &q).await {
            Ok(hits) => Ok(hits
                .iter()
                .map(|h| {
                    let snippet: String = h.content.chars().take(300).collect();
                    reference(
                        &format!("{} ({})", h.role, h.timestamp),
                        &format!("memory:{}", h.id),
                        &snippet,
                    )
                })
                .collect()),
            // Memory switched off is not a failure of the query: nothing is found there.
            Err(crate::memory::Error::Disabled) => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn search_tool(
        &self,
        key: &str,
        tool: &str,
        query: &str,
    ) -> Result<Result<Vec<Value>, String>, Stop> {
        let t = match self
            .run_tool(key, tool, json!({"query": query, "limit": 5}))
            .await?
        {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        if t.status != crate::model::TaskStatus::Succeeded {
            return Ok(Err(super::steps::task_error(&t)));
        }
        let result = t.result.unwrap_or(Value::Null);
        Ok(Ok(result["results"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                reference(
                    r["title"].as_str().unwrap_or(""),
                    &format!("{tool}:{}", r["source"].as_str().unwrap_or("")),
                    r["snippet"].as_str().unwrap_or(""),
                )
            })
            .collect()))
    }

    async fn summary(&mut self, references: &[Value]) -> Result<Result<(), String>, Stop> {
        let artifact = format!("summary-{}", self.id);
        if self.state.groups_completed.contains_key(&2) {
            return Ok(Ok(()));
        }
        self.stage_started(2, json!({"artifact_id": artifact}))
            .await?;
        let Some(writer) = self.agent("writer").await? else {
            return Ok(Err("no writer agent is available".to_owned()));
        };
        if !self.state.executions.contains_key("summary") {
            let started = RunEvent {
                kind: Kind::TaskStarted,
                data: json!({"task_id": "summary", "stage": "summary", "agent_type": "writer",
                             "description": "answer from the references"}),
                at_ms: now_ms(),
                x: json!({"agent_name": writer.name, "agent_profile_id": writer.profile_id}),
            };
            self.append(vec![started]).await?;
        }
        let mut listed = String::new();
        for (i, r) in references.iter().enumerate() {
            listed.push_str(&format!(
                "[{}] {} ({}): {}\n",
                i + 1,
                r["title"].as_str().unwrap_or(""),
                r["source"].as_str().unwrap_or(""),
                r["snippet"].as_str().unwrap_or("")
            ));
        }
        if listed.is_empty() {
            listed.push_str("(no references were found)");
        }
        let inputs = vec![json!({"task_id": "retrieval", "agent_type": "retrieval",
                                 "description": "references", "output": listed})];
        let task = format!(
            "Answer the question from the references, citing them as [n]. Question: {}",
            self.task
        );
        let t = match self.step("summary", &writer, task, inputs, None).await? {
            Ok(t) if t.status == crate::model::TaskStatus::Succeeded => t,
            Ok(t) => {
                return Ok(Err(format!(
                    "the summary failed: {}",
                    super::steps::task_error(&t)
                )));
            }
            Err(e) => return Ok(Err(format!("the summary failed: {e}"))),
        };
        let result = t.result.clone().unwrap_or(Value::Null);
        let done = RunEvent {
            kind: Kind::TaskCompleted,
            data: json!({"task_id": "summary", "stage": "summary", "agent_type": "writer",
                         "result": super::steps::result_text(&result), "artifact_id": artifact,
                         "progress": 100}),
            at_ms: now_ms(),
            x: super::steps::step_details(&t, &result),
        };
        let group = RunEvent::new(
            Kind::GroupCompleted,
            json!({"group": 2, "stage": "summary"}),
            now_ms(),
        );
        self.append(vec![done, group]).await?;
        Ok(Ok(()))
    }
}

/// The question, then the planner's queries, without repeats, at most [`MAX_QUERIES`].
fn searches(question: &str, structured: &Value) -> Vec<String> {
    let mut out = vec![question.trim().to_owned()];
    for q in structured["queries"].as_array().into_iter().flatten() {
        if let Some(q) = q.as_str().map(str::trim).filter(|q| !q.is_empty())
            && !out.iter().any(|o| o == q)
            && out.len() < MAX_QUERIES
        {
            out.push(q.to_owned());
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ev(kind: Kind, data: Value) -> RunEvent {
        RunEvent::new(kind, data, 0)
    }

    #[test]
    fn a_query_run_renders_in_the_platform_sequence() {
        let log = [
            ev(Kind::SessionStarted, json!({})),
            ev(Kind::GroupStarted, json!({"group": 0, "stage": "planning"})),
            ev(
                Kind::TaskStarted,
                json!({"task_id": "planning", "stage": "planning"}),
            ),
            ev(
                Kind::TaskCompleted,
                json!({"task_id": "planning", "stage": "planning", "result": "think"}),
            ),
            ev(
                Kind::GroupCompleted,
                json!({"group": 0, "stage": "planning"}),
            ),
            ev(
                Kind::GroupStarted,
                json!({"group": 1, "stage": "retrieval"}),
            ),
            ev(
                Kind::TaskStarted,
                json!({"task_id": "inv_1", "stage": "retrieval",
                                         "description": "Searching memory: x", "invocation_type": "SEARCH"}),
            ),
            ev(
                Kind::TaskCompleted,
                json!({"task_id": "inv_1", "stage": "retrieval", "result": "{}"}),
            ),
            ev(
                Kind::GroupCompleted,
                json!({"group": 1, "stage": "retrieval", "references": [], "artifact_id": "r"}),
            ),
            ev(
                Kind::GroupStarted,
                json!({"group": 2, "stage": "summary", "artifact_id": "s"}),
            ),
            ev(
                Kind::TaskCompleted,
                json!({"task_id": "summary", "stage": "summary",
                                           "result": "the answer is here", "artifact_id": "s"}),
            ),
            ev(
                Kind::GroupCompleted,
                json!({"group": 2, "stage": "summary"}),
            ),
            ev(Kind::SessionCompleted, json!({})),
        ];
        let out: Vec<Value> = log.iter().flat_map(plan_executor).collect();
        let types: Vec<&str> = out
            .iter()
            .map(|m| m["event_type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "PLAN_DECLARED",
                "PLAN_CHANGE",
                "STREAM_THING",
                "PLAN_CHANGE",
                "PLAN_CHANGE",
                "INVOCATION_DECLARED",
                "INVOCATION_CHANGE",
                "PLAN_CHANGE",
                "ARTIFACT_DECLARED",
                "ARTIFACT_CHANGE",
                "PLAN_CHANGE",
                "ARTIFACT_DECLARED",
                "ARTIFACT_CHANGE",
                "STREAM_CONTENT",
                "PLAN_CHANGE",
                "END",
            ]
        );
        assert!(out.iter().all(|m| m["context"]["mode"] == "plan-executor"));
        assert_eq!(out[0]["messages"][0]["stages"][2]["id"], "summary");
        assert_eq!(out[1]["context"]["stage_id"], "planning");
        assert_eq!(out[5]["context"]["invocation_id"], "inv_1");
        assert_eq!(out[5]["messages"][0]["invocation_type"], "SEARCH");
        assert_eq!(out[8]["messages"][0]["artifact_type"], "reference_list");
        assert_eq!(out[12]["messages"][0]["change_type"], "CONTENT_APPEND");
        assert_eq!(out[12]["messages"][0]["content"], "the answer is here");
    }

    #[test]
    fn an_error_is_a_stream_thing_then_end() {
        let out = plan_executor(&ev(Kind::Error, json!({"error": "boom"})));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["event_type"], "STREAM_THING");
        assert_eq!(out[0]["messages"][0]["content"], "❌ 错误: boom");
        assert_eq!(out[1]["event_type"], "END");
    }

    #[test]
    fn searches_start_with_the_question_and_drop_repeats() {
        let s = searches("q", &json!({"queries": ["q", "a", "", "b", "c"]}));
        assert_eq!(s, ["q", "a", "b"]);
    }
}

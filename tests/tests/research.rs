#![allow(clippy::unwrap_used)]
//! Research sessions (`/api/research/sessions`) end to end with the real `apex-hub` and
//! `apex-node` against a scripted fake upstream: the full event sequence and its fields, the
//! `tasks`, `executions` and memory-layer views after the run, path traversal refused, a node
//! SIGKILLed mid-step, a hub SIGKILLed mid-run and resumed (no completed step run again, the
//! stream resumed by `Last-Event-ID`), a second `execute` attaching, two hubs in shared mode
//! on a real `redis-server`, a plan that is not JSON, and the execute rate limit.

use std::time::Duration;

use apex_tests::api::SseParser;
use apex_tests::api::call;
use apex_tests::fake_llm::{FakeLlm, FakeOptions};
use apex_tests::shared::shared_hub;
use apex_tests::{Api, Hub, HubOptions, Node, NodeOptions, RedisServer};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// How long a whole run may take in these tests.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// The plan the coordinator answers: explorer (group 0), critic after it (group 1), writer
/// after both (group 2); the dependency on position 7 does not exist and is repaired away.
fn plan() -> Value {
    json!({"tasks": [
        {"description": "Survey the state space model papers", "assigned_agent": "explorer",
         "priority": "high", "dependencies": []},
        {"description": "Criticise the survey", "assigned_agent": "critic",
         "priority": "medium", "dependencies": [0, 7]},
        {"description": "Write the report section", "assigned_agent": "writer",
         "priority": "low", "dependencies": [0, 1]},
    ]})
}

fn fake_options() -> FakeOptions {
    FakeOptions {
        models: vec!["fake-model".to_owned(), "slow-1500-a".to_owned()],
        structured: vec![
            ("tasks".to_owned(), plan()),
            (
                "result".to_owned(),
                json!({"result": "finding {seq}", "key_findings": ["key finding {seq}"],
                       "uncertainties": ["open question {seq}"], "suggestions": ["go on"],
                       "confidence": 0.8}),
            ),
        ],
        ..FakeOptions::default()
    }
}

/// A hub config with the fake upstream as its only provider and agents asking `model`.
fn config(fake: &FakeLlm, model: &str) -> String {
    format!(
        "[[llm.providers]]\nname = \"up\"\nbase_url = \"{}\"\n\
         models = [\"fake-model\", \"slow-1500-a\"]\n\
         [agents]\nrole_model = \"{model}\"\n",
        fake.base_url()
    )
}

async fn create(api: &Api, name: &str) -> String {
    let (status, v) = call(
        api,
        Method::POST,
        "/api/research/sessions",
        Some(json!({"name": name, "task": "How did state space models evolve?"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "created");
    v["id"].as_str().unwrap().to_owned()
}

/// One event of the stream: its SSE id, type and data.
#[derive(Debug, Clone)]
struct Ev {
    id: u64,
    kind: String,
    data: Value,
}

/// Reads `execute`'s stream (after `last_id` when given) until it ends, or until `stop` says
/// so of an event (then the connection is dropped).
async fn execute_until(
    api: &Api,
    id: &str,
    last_id: Option<u64>,
    stop: impl Fn(&Ev) -> bool,
) -> Vec<Ev> {
    let mut req = api.request(
        Method::POST,
        &format!("/api/research/sessions/{id}/execute"),
    );
    if let Some(l) = last_id {
        req = req.header("Last-Event-ID", l.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::default();
    let mut out = Vec::new();
    let read = async {
        while let Some(chunk) = body.next().await {
            parser.push(&chunk.unwrap()).unwrap();
            for ((_, v), sid) in parser.events.drain(..).zip(parser.ids.drain(..)) {
                let ev = Ev {
                    id: sid.parse().unwrap(),
                    kind: v["type"].as_str().unwrap().to_owned(),
                    data: v["data"].clone(),
                };
                let end = stop(&ev);
                out.push(ev);
                if end {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(RUN_TIMEOUT, read)
        .await
        .expect("the research stream did not end in time");
    out
}

async fn execute(api: &Api, id: &str) -> Vec<Ev> {
    execute_until(api, id, None, |_| false).await
}

fn kinds(events: &[Ev]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

/// The persona of a default agent type.
async fn persona(api: &Api, agent_type: &str) -> String {
    let (status, v) = call(api, Method::GET, "/api/agents/profiles/defaults", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent_type"] == agent_type)
        .unwrap()["persona"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// How many requests the fake got whose system message is `persona`.
fn requests_of(fake: &FakeLlm, persona: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|r| {
            let m = &r["body"]["messages"][0];
            m["role"] == "system" && m["content"].as_str() == Some(persona)
        })
        .count()
}

/// The whole sequence of a run of [`plan`]: asserted in order and field by field.
fn assert_full_run(id: &str, events: &[Ev]) {
    let without_progress: Vec<&str> = kinds(events)
        .into_iter()
        .filter(|k| *k != "task_progress")
        .collect();
    assert_eq!(
        without_progress,
        [
            "session_started",
            "decomposition_complete",
            "group_started",
            "task_started",
            "task_completed",
            "group_completed",
            "group_started",
            "task_started",
            "task_completed",
            "group_completed",
            "group_started",
            "task_started",
            "task_completed",
            "group_completed",
            "synthesis_started",
            "synthesis_complete",
            "session_completed",
        ],
        "{events:#?}"
    );
    // Each step's progress comes between its start and its end.
    for (i, e) in events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == "task_progress")
    {
        let task = &e.data["task_id"];
        let started = events[..i]
            .iter()
            .any(|s| s.kind == "task_started" && &s.data["task_id"] == task);
        let ended = events[..i]
            .iter()
            .any(|s| s.kind == "task_completed" && &s.data["task_id"] == task);
        assert!(started && !ended, "progress out of place: {e:?}");
    }
    // Ids count up from 1 with no gap.
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=events.len() as u64).collect::<Vec<_>>());
    let started = &events[0].data;
    assert_eq!(started["session_id"], id);
    assert!(started["message"].is_string());
    let plan = &events[1].data;
    let tasks = plan["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3);
    assert!(
        plan["message"].as_str().unwrap().contains("repaired"),
        "{plan}"
    );
    assert_eq!(tasks[1]["dependencies"], json!([tasks[0]["id"]]));
    assert_eq!(tasks[2]["execution_group"], 2);
    let completed: Vec<&Ev> = events
        .iter()
        .filter(|e| e.kind == "task_completed")
        .collect();
    assert_eq!(completed.len(), 3);
    let progress: Vec<u64> = completed
        .iter()
        .map(|e| e.data["progress"].as_u64().unwrap())
        .collect();
    assert_eq!(progress, vec![33, 66, 100]);
    for (e, t) in completed.iter().zip(tasks) {
        assert_eq!(e.data["task_id"], t["id"]);
        assert_eq!(e.data["agent_type"], t["assigned_agent"]);
        assert!(
            e.data["result"].as_str().unwrap().starts_with("finding "),
            "{e:?}"
        );
    }
    for e in events.iter().filter(|e| e.kind == "task_started") {
        assert!(e.data["task_id"].is_string() && e.data["description"].is_string());
        assert!(e.data["agent_type"].is_string());
    }
    for e in events.iter().filter(|e| e.kind == "task_progress") {
        assert!(e.data["message"].is_string() && e.data["progress"].is_number());
    }
    let groups: Vec<&Value> = events
        .iter()
        .filter(|e| e.kind == "group_started")
        .map(|e| &e.data)
        .collect();
    assert_eq!(groups[0], &json!({"group": 0, "tasks": 1}));
    assert!(
        events[events.len() - 2].data["synthesis"]
            .as_str()
            .unwrap()
            .starts_with("finding ")
    );
    let done = &events[events.len() - 1].data;
    assert_eq!(done["session_id"], id);
    assert!(done["total_tokens"].as_u64().unwrap() > 0);
    assert!(done["duration_ms"].is_number());
}

async fn hub_and_node(fake: &FakeLlm, model: &str) -> (Hub, Node) {
    let hub = Hub::start_with_config(&config(fake, model), &[], None)
        .await
        .unwrap();
    let node = Node::start(&hub, NodeOptions::named("researcher-1"))
        .await
        .unwrap();
    (hub, node)
}

#[tokio::test]
async fn a_run_streams_every_event_in_order_and_the_views_show_what_it_did() {
    let fake = FakeLlm::start(fake_options()).await.unwrap();
    let (hub, _node) = hub_and_node(&fake, "").await;
    let _second = Node::start(&hub, NodeOptions::named("researcher-2"))
        .await
        .unwrap();
    let ann = Api::register_user(&hub.url(), "ann@example.com")
        .await
        .unwrap();
    let bob = Api::register_user(&hub.url(), "bob@example.com")
        .await
        .unwrap();
    let id = create(&ann, "SSM survey").await;
    let events = execute(&ann, &id).await;
    assert_full_run(&id, &events);
    // Each dependant was given its dependencies' outputs.
    let reqs = fake.requests();
    let first = events
        .iter()
        .find(|e| e.kind == "task_completed")
        .unwrap()
        .data["result"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reqs.iter().any(|r| {
            let text = r["body"]["messages"].to_string();
            text.contains("Criticise the survey") && text.contains(&first)
        }),
        "the critic did not get the explorer's output"
    );
    // The session.
    let (status, s) = call(
        &ann,
        Method::GET,
        &format!("/api/research/sessions/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s["status"], "completed");
    assert_eq!(s["progress"], 100);
    assert_eq!(s["current_stage"], "synthesis");
    assert_eq!(s["workspace_path"], format!("/workspace/sessions/{id}"));
    assert!(s["completed_at"].is_string() && s["total_tokens"].as_u64().unwrap() > 0);
    // Tasks.
    let (_, t) = call(
        &ann,
        Method::GET,
        &format!("/api/research/sessions/{id}/tasks"),
        None,
    )
    .await;
    assert_eq!(t["total"], 3);
    for (i, task) in t["tasks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(task["status"], "completed");
        assert_eq!(task["session_id"], id.as_str());
        assert_eq!(task["execution_order"], i);
        assert_eq!(task["execution_group"], i);
        assert!(task["output"].as_str().unwrap().starts_with("finding "));
        assert!(task["parent_task_id"].is_null() && task["created_at"].is_string());
    }
    assert_eq!(t["tasks"][0]["priority"], "high");
    assert_eq!(t["tasks"][2]["dependencies"].as_array().unwrap().len(), 2);
    // Executions: the plan, three tasks, the synthesis.
    let (_, x) = call(
        &ann,
        Method::GET,
        &format!("/api/research/sessions/{id}/executions"),
        None,
    )
    .await;
    assert_eq!(x["total"], 5, "{x}");
    let xs = x["executions"].as_array().unwrap();
    assert_eq!(xs[0]["agent_type"], "meta_coordinator");
    assert_eq!(xs[4]["agent_type"], "synthesizer");
    for e in &xs[1..4] {
        assert_eq!(e["status"], "completed");
        assert!(e["research_task_id"].is_string());
        assert!(
            e["structured_output"]["key_findings"][0]
                .as_str()
                .unwrap()
                .starts_with("key finding")
        );
        assert_eq!(e["confidence"], 0.8);
        assert_eq!(e["retry_count"], 0);
        assert!(e["model_used"].is_string() && e["started_at"].is_string());
        assert!(
            e["raw_output_path"]
                .as_str()
                .unwrap()
                .ends_with("/output.md")
        );
    }
    // Memory layers.
    let (_, m) = call(
        &ann,
        Method::GET,
        &format!("/api/research/sessions/{id}/memory"),
        None,
    )
    .await;
    let layers = m["layers"].as_array().unwrap();
    let names: Vec<&str> = layers
        .iter()
        .map(|l| l["layer"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["L2", "L1", "L0"]);
    let files = |l: usize| -> Vec<String> {
        layers[l]["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap().to_owned())
            .collect()
    };
    let root = format!("/workspace/sessions/{id}");
    assert!(files(0).contains(&format!("{root}/L2/key_findings.md")));
    assert!(files(0).contains(&format!("{root}/L2/open_questions.md")));
    assert_eq!(files(1).len(), 3);
    assert!(files(2).contains(&format!("{root}/L0/explorer/output.md")));
    let (_, only) = call(
        &ann,
        Method::GET,
        &format!("/api/research/sessions/{id}/memory?layer=L1"),
        None,
    )
    .await;
    assert_eq!(only["layers"].as_array().unwrap().len(), 1);
    let (status, c) = call(
        &ann,
        Method::GET,
        &format!("/api/research/sessions/{id}/memory/content?path={root}/L2/key_findings.md"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(c["layer"], "L2");
    assert!(c["content"].as_str().unwrap().contains("key finding"));
    let (status, c) = call(
        &ann,
        Method::GET,
        &format!("/api/research/sessions/{id}/memory/content?path=L0/explorer/output.md"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert!(c["content"].as_str().unwrap().contains(&first));
    // Paths outside the session are refused.
    for bad in [
        "../other/L2/key_findings.md".to_owned(),
        "/etc/passwd".to_owned(),
        format!("{root}/../x/L2/key_findings.md"),
        "/workspace/sessions/another/L2/key_findings.md".to_owned(),
    ] {
        let (status, v) = call(
            &ann,
            Method::GET,
            &format!(
                "/api/research/sessions/{id}/memory/content?path={}",
                urlencode(&bad)
            ),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"]["param"], "path");
    }
    let (status, _) = call(
        &ann,
        Method::GET,
        &format!("/api/research/sessions/{id}/memory/content?path=L2/nothing.md"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Replays: from the start, and after an id with no duplicate.
    let again = execute(&ann, &id).await;
    assert_eq!(kinds(&again), kinds(&events));
    let tail = execute_until(&ann, &id, Some(5), |_| false).await;
    assert_eq!(tail.first().unwrap().id, 6);
    assert_eq!(tail.len(), events.len() - 5);
    // Resuming after the last event: 204, nothing more will come (EventSource stops).
    let resp = ann
        .request(
            Method::POST,
            &format!("/api/research/sessions/{id}/execute"),
        )
        .header("Last-Event-ID", events.len().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    // Another user sees none of it.
    for path in ["", "/tasks", "/executions", "/memory"] {
        let (status, _) = call(
            &bob,
            Method::GET,
            &format!("/api/research/sessions/{id}{path}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = call(
        &bob,
        Method::POST,
        &format!("/api/research/sessions/{id}/execute"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = call(&bob, Method::GET, "/api/research/sessions", None).await;
    assert_eq!(list["total"], 0);
    let (_, list) = call(
        &ann,
        Method::GET,
        "/api/research/sessions?status=completed&page=1&page_size=5",
        None,
    )
    .await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["page_size"], 5);
    assert_eq!(list["sessions"][0]["id"], id.as_str());
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn sessions_are_validated_archived_and_deleted() {
    let fake = FakeLlm::start(fake_options()).await.unwrap();
    let hub = Hub::start_with_config(&config(&fake, ""), &[], None)
        .await
        .unwrap();
    let api = hub.api();
    for (body, param) in [
        (json!({"name": "", "task": "x"}), "name"),
        (json!({"name": "n", "task": "  "}), "task"),
    ] {
        let (status, v) = call(api, Method::POST, "/api/research/sessions", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["param"], param);
    }
    let id = create(api, "to archive").await;
    let path = format!("/api/research/sessions/{id}");
    let (status, v) = call(api, Method::PUT, &path, Some(json!({"status": "running"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = call(
        api,
        Method::PUT,
        &path,
        Some(json!({"name": "renamed", "status": "archived"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "renamed");
    assert_eq!(v["status"], "archived");
    let (status, _) = call(api, Method::POST, &format!("{path}/execute"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, v) = call(api, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = call(api, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_plan_that_is_not_json_ends_the_run_with_an_error_event() {
    // No structured answers: the coordinator answers plain text.
    let fake = FakeLlm::start(FakeOptions {
        models: vec!["fake-model".to_owned(), "slow-1500-a".to_owned()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let (hub, _node) = hub_and_node(&fake, "").await;
    let api = hub.api();
    let id = create(api, "no plan").await;
    let events = execute(api, &id).await;
    assert_eq!(kinds(&events), ["session_started", "error"], "{events:?}");
    assert!(
        events[1].data["error"].as_str().unwrap().contains("plan"),
        "{events:?}"
    );
    let (_, s) = call(
        api,
        Method::GET,
        &format!("/api/research/sessions/{id}"),
        None,
    )
    .await;
    assert_eq!(s["status"], "failed");
}

#[tokio::test]
async fn a_node_killed_mid_step_loses_nothing_and_each_task_completes_once() {
    let fake = FakeLlm::start(fake_options()).await.unwrap();
    let (hub, mut first) = hub_and_node(&fake, "slow-1500-a").await;
    let api = hub.api();
    let id = create(api, "node loss").await;
    // Stop reading once the first research task has started on the only node.
    let before = execute_until(api, &id, None, |e| e.kind == "task_started").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.kill().unwrap();
    let _second = Node::start(&hub, NodeOptions::named("researcher-2"))
        .await
        .unwrap();
    let last = before.last().unwrap().id;
    let after = execute_until(api, &id, Some(last), |_| false).await;
    let all: Vec<Ev> = before.into_iter().chain(after).collect();
    assert_eq!(all.last().unwrap().kind, "session_completed", "{all:#?}");
    let completed: Vec<&Value> = all
        .iter()
        .filter(|e| e.kind == "task_completed")
        .map(|e| &e.data["task_id"])
        .collect();
    assert_eq!(completed.len(), 3, "{all:#?}");
    let unique: std::collections::HashSet<String> =
        completed.iter().map(|v| v.to_string()).collect();
    assert_eq!(unique.len(), 3);
    let (_, x) = call(
        api,
        Method::GET,
        &format!("/api/research/sessions/{id}/executions"),
        None,
    )
    .await;
    // The first task moved to the second node: its second attempt.
    assert_eq!(x["executions"][1]["retry_count"], 1, "{x}");
}

#[tokio::test]
async fn a_hub_killed_mid_run_resumes_without_running_a_completed_step_again() {
    let fake = FakeLlm::start(fake_options()).await.unwrap();
    let (mut hub, _node) = hub_and_node(&fake, "slow-1500-a").await;
    let api = hub.api().clone();
    let id = create(&api, "hub loss").await;
    let explorer = persona(&api, "explorer").await;
    // Until the first group has completed.
    let before = execute_until(&api, &id, None, |e| e.kind == "group_completed").await;
    hub.kill_and_restart().await.unwrap();
    let api = hub.api().clone();
    let last = before.last().unwrap().id;
    let after = execute_until(&api, &id, Some(last), |_| false).await;
    assert_eq!(after.first().unwrap().id, last + 1, "a gap or a duplicate");
    let all: Vec<Ev> = before.into_iter().chain(after).collect();
    assert_eq!(all.last().unwrap().kind, "session_completed", "{all:#?}");
    let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=all.len() as u64).collect::<Vec<_>>());
    assert_eq!(all.iter().filter(|e| e.kind == "task_completed").count(), 3);
    // The explorer's step had completed before the kill: it ran once.
    assert_eq!(requests_of(&fake, &explorer), 1);
}

#[tokio::test]
async fn a_second_execute_attaches_to_the_run_in_progress() {
    let fake = FakeLlm::start(fake_options()).await.unwrap();
    let (hub, _node) = hub_and_node(&fake, "slow-1500-a").await;
    let api = hub.api().clone();
    let id = create(&api, "attach").await;
    let coordinator = persona(&api, "meta_coordinator").await;
    let (a, b) = tokio::join!(execute(&api, &id), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        execute(&api, &id).await
    });
    assert_eq!(kinds(&a), kinds(&b));
    assert_eq!(a.last().unwrap().kind, "session_completed");
    assert_eq!(requests_of(&fake, &coordinator), 1, "one run, one plan");
}

#[tokio::test]
async fn two_shared_hubs_serve_one_run_and_one_takes_it_over_when_the_other_dies() {
    let redis = RedisServer::start().unwrap();
    let fake = FakeLlm::start(fake_options()).await.unwrap();
    let toml = config(&fake, "slow-1500-a");
    let a = Hub::start_with_config(&toml, &[], Some(shared_hub(&redis, None)))
        .await
        .unwrap();
    let b_opts = shared_hub(&redis, Some(a.options()));
    let b = Hub::start_with_config(&toml, &[], Some(b_opts))
        .await
        .unwrap();
    let _node = Node::start(&a, NodeOptions::named("shared-researcher"))
        .await
        .unwrap();
    let id = create(a.api(), "shared").await;
    // Started at hub B; B dies after the first group.
    let before = execute_until(b.api(), &id, None, |e| e.kind == "group_completed").await;
    b.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    let last = before.last().unwrap().id;
    let after = execute_until(a.api(), &id, Some(last), |_| false).await;
    let all: Vec<Ev> = before.into_iter().chain(after).collect();
    assert_eq!(all.last().unwrap().kind, "session_completed", "{all:#?}");
    let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=all.len() as u64).collect::<Vec<_>>());
    assert_eq!(all.iter().filter(|e| e.kind == "task_completed").count(), 3);
    let (_, t) = call(
        a.api(),
        Method::GET,
        &format!("/api/research/sessions/{id}/tasks"),
        None,
    )
    .await;
    assert!(
        t["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] == "completed"),
        "{t}"
    );
}

#[tokio::test]
async fn execute_is_rate_limited_per_caller() {
    let fake = FakeLlm::start(fake_options()).await.unwrap();
    let toml = format!(
        "{}[rate_limits]\nexecute_per_minute = 2\n",
        config(&fake, "")
    );
    let hub = Hub::start_with_config(&toml, &[], Some(HubOptions::default()))
        .await
        .unwrap();
    let ann = Api::register_user(&hub.url(), "ann@example.com")
        .await
        .unwrap();
    let id = create(&ann, "limited").await;
    let path = format!("/api/research/sessions/{id}/execute");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let resp = ann.request(Method::POST, &path).send().await.unwrap();
        statuses.push(resp.status());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(resp.headers().contains_key("retry-after"));
            assert_eq!(resp.headers()["x-ratelimit-limit"], "2");
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
}

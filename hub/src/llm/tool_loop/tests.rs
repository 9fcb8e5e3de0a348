//! The loop's pure parts (selection, function names, call assembly, the round decision), the
//! mock's tool rule, and the loop itself over the mock or a scripted backend with a scripted
//! runner.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::*;
use crate::llm::{Backend, Mock, ModelInfo, ProviderConfig, ProviderKind};

fn entry(name: &str, parameters: Value) -> ToolEntry {
    ToolEntry {
        name: name.to_owned(),
        description: format!("{name} tool"),
        parameters,
        examples: None,
        nodes: None,
    }
}

fn catalogue() -> Vec<ToolEntry> {
    vec![
        entry(
            "sha256",
            json!({"type": "object", "properties": {"path": {"type": "string"},
                   "text": {"type": "string"}}}),
        ),
        entry(
            "sleep",
            json!({"type": "object", "properties": {"ms": {"type": "integer"}},
                   "required": ["ms"]}),
        ),
        entry("echo", json!(true)),
        entry("llm.summarize", json!({"type": "object"})),
        entry("llm.chat", json!({"type": "object"})),
    ]
}

#[test]
fn server_tools_parse_all_names_or_nothing() {
    assert_eq!(
        Selection::parse(&json!("all")).unwrap(),
        Some(Selection::All)
    );
    assert_eq!(Selection::parse(&json!(null)).unwrap(), None);
    assert_eq!(Selection::parse(&json!([])).unwrap(), None);
    assert_eq!(
        Selection::parse(&json!(["sha256", "echo", "sha256"])).unwrap(),
        Some(Selection::Named(vec!["sha256".into(), "echo".into()]))
    );
    for bad in [
        json!("some"),
        json!([1]),
        json!([""]),
        json!({"a": 1}),
        json!(true),
    ] {
        let e = Selection::parse(&bad).unwrap_err();
        assert_eq!(e.param(), Some("server_tools"), "{bad}");
        assert_eq!(e.status(), 400);
    }
}

#[test]
fn function_names_are_openai_safe_and_unique() {
    let taken: HashSet<String> = ["echo".to_owned()].into();
    let long = "x".repeat(80);
    let names = function_names(
        [
            "llm.summarize",
            "llm__summarize",
            "a b/c",
            "echo",
            &long,
            &long,
        ],
        &taken,
    );
    assert_eq!(names[0], "llm__summarize");
    assert_eq!(names[1], "llm__summarize_2");
    assert_eq!(names[2], "a_b_c");
    assert_eq!(names[3], "echo_2", "the client's own name is never reused");
    assert_eq!(names[4].len(), 64);
    assert_eq!(names[5].len(), 64);
    assert_ne!(names[4], names[5]);
    assert!(names[5].ends_with("_2"));
    for n in &names {
        assert!(
            n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        );
    }
}

#[test]
fn resolve_names_unknown_tools_and_conflicts() {
    let cat = catalogue();
    let none = |_: &str| false;
    let e = ServerTools::resolve(
        &Selection::Named(vec!["sha256".into(), "nope".into()]),
        &cat,
        None,
        none,
    )
    .unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.to_string().contains("`nope`"), "{e}");
    let client = json!([{"type": "function", "function": {"name": "sha256"}}]);
    let e = ServerTools::resolve(
        &Selection::Named(vec!["sha256".into()]),
        &cat,
        Some(&client),
        none,
    )
    .unwrap_err();
    assert!(e.to_string().contains("both"), "{e}");

    // `all` leaves out excluded tools and the client's own names.
    let t =
        ServerTools::resolve(&Selection::All, &cat, Some(&client), |n| n == "llm.chat").unwrap();
    let tools: Vec<&str> = t.offered().iter().map(|o| o.tool.as_str()).collect();
    assert_eq!(tools, vec!["sleep", "echo", "llm.summarize"]);
    assert_eq!(t.tool_of("llm__summarize"), Some("llm.summarize"));
    assert_eq!(
        t.tool_of("sha256"),
        None,
        "the client's sha256 stays the client's"
    );
    // A schema that is not an object schema becomes the loosest one.
    assert_eq!(
        t.offered()[1].definition,
        json!({"type": "function", "function": {"name": "echo", "description": "echo tool",
               "parameters": {"type": "object"}}})
    );
    let merged = t.merged_tools(Some(&client)).unwrap();
    assert_eq!(merged.as_array().unwrap().len(), 4);
    assert_eq!(merged[0], client[0], "the client's tools come first");
}

#[test]
fn calls_assemble_from_deltas_and_whole_arrays() {
    let mut a = CallAssembler::default();
    a.push(&json!([{"index": 0, "id": "c1", "type": "function",
                    "function": {"name": "sha256", "arguments": ""}}]));
    a.push(&json!([{"index": 1, "id": "c2", "function": {"name": "echo", "arguments": "{}"}}]));
    a.push(&json!([{"index": 0, "function": {"arguments": "{\"text\":"}}]));
    a.push(&json!([{"index": 0, "function": {"arguments": "\"hi\"}"}}]));
    a.push(&json!([{"index": 99999999, "function": {"name": "huge"}}]));
    let calls = a.finish(0);
    assert_eq!(
        calls,
        vec![
            ToolCall {
                id: "c1".into(),
                name: "sha256".into(),
                arguments: "{\"text\":\"hi\"}".into()
            },
            ToolCall {
                id: "c2".into(),
                name: "echo".into(),
                arguments: "{}".into()
            },
        ]
    );
    let mut a = CallAssembler::default();
    a.push(
        &json!([{"type": "function", "function": {"name": "x", "arguments": "{}"}},
                   {"id": "k", "type": "function", "function": {"name": "y", "arguments": ""}}]),
    );
    let calls = a.finish(3);
    assert_eq!(calls[0].id, "call_3_0", "a call without an id gets one");
    assert_eq!(calls[1].id, "k");
}

#[test]
fn rounds_run_server_calls_only_and_stop_at_the_limit() {
    let cat = catalogue();
    let tools = ServerTools::resolve(&Selection::Named(vec!["sha256".into()]), &cat, None, |_| {
        false
    })
    .unwrap();
    let call = |name: &str| ToolCall {
        id: format!("id-{name}"),
        name: name.into(),
        arguments: "{}".into(),
    };
    assert_eq!(
        decide(vec![call("sha256")], &tools, 0, 8),
        Next::Run(vec![(call("sha256"), "sha256".into())])
    );
    assert_eq!(
        decide(vec![call("sha256")], &tools, 8, 8),
        Next::Final {
            client_calls: vec![],
            skipped: vec![(call("sha256"), "sha256".into())],
            exhausted: true
        }
    );
    assert_eq!(
        decide(vec![call("sha256"), call("mine")], &tools, 0, 8),
        Next::Final {
            client_calls: vec![call("mine")],
            skipped: vec![(call("sha256"), "sha256".into())],
            exhausted: false
        },
        "a mixed answer goes to the client with its own calls only"
    );
    assert_eq!(
        decide(vec![], &tools, 0, 8),
        Next::Final {
            client_calls: vec![],
            skipped: vec![],
            exhausted: false
        }
    );
}

#[test]
fn arguments_must_be_an_object() {
    assert_eq!(parse_arguments("").unwrap(), json!({}));
    assert_eq!(parse_arguments(r#"{"a":1}"#).unwrap(), json!({"a": 1}));
    assert!(parse_arguments("[1]").is_err());
    assert!(
        parse_arguments("{oops")
            .unwrap_err()
            .contains("not valid JSON")
    );
}

#[test]
fn outcomes_become_tool_messages() {
    let call = ToolCall {
        id: "c".into(),
        name: "f".into(),
        arguments: "{}".into(),
    };
    let o = RunOutcome::error(Some("t".into()), "failed", "boom", "it broke");
    let m = tool_message(&call, &o);
    assert_eq!(m["role"], "tool");
    assert_eq!(m["tool_call_id"], "c");
    let content: Value = serde_json::from_str(m["content"].as_str().unwrap()).unwrap();
    assert_eq!(
        content,
        json!({"error": {"code": "boom", "message": "it broke", "status": "failed"}})
    );
}

fn mock_request(tools: &ServerTools, text: &str) -> ChatRequest {
    let mut r = ChatRequest::simple(
        "mock",
        vec![json!({"role": "user", "content": text})],
        false,
    );
    r.tools = tools.merged_tools(None);
    r
}

#[test]
fn the_mock_calls_a_named_tool_with_arguments_from_the_prompt() {
    let tools = ServerTools::resolve(&Selection::All, &catalogue(), None, |_| false).unwrap();
    let c = crate::llm::mock::tool_call(&mock_request(&tools, "Please SHA256: \"hello\"")).unwrap();
    assert_eq!(c[0]["function"]["name"], "sha256");
    assert_eq!(c[0]["function"]["arguments"], r#"{"text":"hello"}"#);
    let c = crate::llm::mock::tool_call(&mock_request(&tools, "sleep for 2500 ms")).unwrap();
    assert_eq!(c[0]["function"]["name"], "sleep");
    assert_eq!(c[0]["function"]["arguments"], r#"{"ms":2500}"#);
    let c = crate::llm::mock::tool_call(&mock_request(&tools, "try llm.summarize now")).unwrap();
    assert_eq!(c[0]["function"]["name"], "llm__summarize");
    assert!(crate::llm::mock::tool_call(&mock_request(&tools, "sha256sum it")).is_none());
    assert!(crate::llm::mock::tool_call(&mock_request(&tools, "hello there")).is_none());
    // After the tool message it reports the result.
    let mut r = mock_request(&tools, "sha256: hi");
    r.messages.push(assistant_message(
        "",
        &[ToolCall {
            id: "c9".into(),
            name: "sha256".into(),
            arguments: "{}".into(),
        }],
    ));
    r.messages
        .push(json!({"role": "tool", "tool_call_id": "c9", "content": "{\"sha256\":\"ab\"}"}));
    assert!(crate::llm::mock::tool_call(&r).is_none());
    assert_eq!(
        crate::llm::mock::tool_answer(&r).unwrap(),
        "The tool `sha256` returned {\"sha256\":\"ab\"}."
    );
}

/// Answers every call with the result `{"ran": tool, "args": arguments}`, counting calls.
#[derive(Default)]
struct Scripted {
    calls: AtomicU32,
    fail: bool,
}

impl ToolRunner for Scripted {
    fn run<'a>(
        &'a self,
        tool: &'a str,
        arguments: &'a str,
        _call_id: &'a str,
    ) -> BoxFuture<'a, RunOutcome> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let fail = self.fail;
        async move {
            if fail {
                return RunOutcome::error(Some(format!("task-{n}")), "failed", "boom", "it broke");
            }
            RunOutcome {
                task_id: Some(format!("task-{n}")),
                status: "succeeded".into(),
                content: json!({"ran": tool, "args": arguments}),
                duration_ms: 1.5,
            }
        }
        .boxed()
    }
}

fn mock_gateway() -> Arc<Gateway> {
    let cfg = ProviderConfig {
        name: "mock".into(),
        kind: ProviderKind::Mock,
        ..ProviderConfig::default()
    };
    Arc::new(Gateway::empty().with_backend(Arc::new(Mock::new(&cfg))))
}

async fn collect(s: ChunkStream) -> Vec<ChatChunk> {
    s.map(|c| c.unwrap()).collect().await
}

#[tokio::test]
async fn the_loop_runs_the_call_and_answers_with_its_result() {
    let tools = ServerTools::resolve(&Selection::All, &catalogue(), None, |_| false).unwrap();
    let runner = Arc::new(Scripted::default());
    for stream in [false, true] {
        let mut req = mock_request(&ServerTools::default(), "sha256: hello");
        req.stream = stream;
        req.include_usage = stream;
        let lp = ToolLoop::new(mock_gateway(), tools.clone(), runner.clone(), 8);
        let chunks = collect(
            lp.start(
                req,
                CallContext::new(format!("r-{stream}"), crate::llm::Caller::Http),
            )
            .await
            .unwrap(),
        )
        .await;
        let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
        assert!(
            text.contains(r#"{"args":"{\"text\":\"hello\"}","ran":"sha256"}"#),
            "{text}"
        );
        assert!(chunks.iter().all(|c| c.tool_calls.is_none()));
        let last = chunks.last().unwrap();
        let runs = &last.apex.as_ref().unwrap()["apex_tool_runs"];
        assert_eq!(runs[0]["tool"], "sha256");
        assert_eq!(runs[0]["status"], "succeeded");
        assert_eq!(runs[0]["duration_ms"], 1.5);
        assert!(
            last.apex
                .as_ref()
                .unwrap()
                .get("apex_tool_rounds_exhausted")
                .is_none()
        );
        if stream {
            assert!(chunks.len() > 3, "streamed word by word");
            assert!(last.usage.is_some(), "the usage chunk is last");
            assert_eq!(
                chunks[chunks.len() - 2].finish_reason.as_deref(),
                Some("stop")
            );
        } else {
            assert_eq!(chunks.len(), 1);
            assert_eq!(last.finish_reason.as_deref(), Some("stop"));
            assert!(
                last.usage.unwrap().completion_tokens > 1,
                "summed over both rounds"
            );
        }
    }
    assert_eq!(runner.calls.load(Ordering::Relaxed), 2);
}

/// A model that calls `sha256` every time.
struct AlwaysCalls;

impl Backend for AlwaysCalls {
    fn name(&self) -> &str {
        "always"
    }
    fn models(&self) -> Vec<ModelInfo> {
        Vec::new()
    }
    fn serves(&self, model: &str) -> bool {
        model == "always"
    }
    fn call<'a>(
        &'a self,
        _model: &'a str,
        req: &'a ChatRequest,
        _ctx: &'a CallContext,
    ) -> BoxFuture<'a, Result<ChunkStream, LlmError>> {
        let n = req.messages.len();
        async move {
            let c = ChatChunk {
                text: format!("round {n}. "),
                tool_calls: Some(json!([{"id": format!("c{n}"), "type": "function",
                    "function": {"name": "sha256", "arguments": "{\"text\":\"x\"}"}}])),
                finish_reason: Some("tool_calls".into()),
                ..ChatChunk::default()
            };
            Ok(futures::stream::once(async move { Ok(c) }).boxed())
        }
        .boxed()
    }
}

#[tokio::test]
async fn exhausted_rounds_return_the_last_answer_flagged() {
    let tools = ServerTools::resolve(
        &Selection::Named(vec!["sha256".into()]),
        &catalogue(),
        None,
        |_| false,
    )
    .unwrap();
    let runner = Arc::new(Scripted {
        fail: true,
        ..Scripted::default()
    });
    let gw = Arc::new(Gateway::empty().with_backend(Arc::new(AlwaysCalls)));
    let lp = ToolLoop::new(gw, tools, runner.clone(), 2);
    let req = ChatRequest::simple(
        "always",
        vec![json!({"role": "user", "content": "go"})],
        false,
    );
    let chunks = collect(
        lp.start(req, CallContext::new("ex", crate::llm::Caller::Http))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(runner.calls.load(Ordering::Relaxed), 2, "two rounds ran");
    let c = &chunks[0];
    assert_eq!(c.text, "round 1. round 3. round 5. ", "every round's text");
    assert!(
        c.tool_calls.is_none(),
        "server calls never reach the client"
    );
    assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
    let apex = c.apex.as_ref().unwrap();
    assert_eq!(apex["apex_tool_rounds_exhausted"], true);
    let statuses: Vec<&str> = apex["apex_tool_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["failed", "failed", "skipped"]);
    assert!(apex["apex_tool_runs"][2]["task_id"].is_null());
}

#[tokio::test]
async fn client_tools_pass_through_and_unknown_models_fail_at_once() {
    let tools = ServerTools::resolve(
        &Selection::Named(vec!["sleep".into()]),
        &catalogue(),
        None,
        |_| false,
    )
    .unwrap();
    let runner = Arc::new(Scripted::default());
    let mut req = ChatRequest::simple(
        "mock",
        vec![json!({"role": "user", "content": "weather: Paris"})],
        true,
    );
    req.tools = Some(json!([{"type": "function", "function": {"name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]));
    let lp = ToolLoop::new(mock_gateway(), tools.clone(), runner.clone(), 8);
    let chunks = collect(
        lp.start(req, CallContext::new("ct", crate::llm::Caller::Http))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(runner.calls.load(Ordering::Relaxed), 0);
    let calls = chunks.iter().find_map(|c| c.tool_calls.clone()).unwrap();
    assert_eq!(calls[0]["function"]["name"], "weather");
    assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(
        chunks.last().unwrap().finish_reason.as_deref(),
        Some("tool_calls")
    );
    let lp = ToolLoop::new(mock_gateway(), tools, runner, 8);
    let req = ChatRequest::simple("nope", vec![json!({"role": "user", "content": "x"})], false);
    let e = lp
        .start(req, CallContext::new("nf", crate::llm::Caller::Http))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status(), 404);
}

/// Never finishes a call; tells when one started.
struct Hangs(tokio::sync::mpsc::Sender<()>);

impl ToolRunner for Hangs {
    fn run<'a>(
        &'a self,
        _tool: &'a str,
        _arguments: &'a str,
        _call_id: &'a str,
    ) -> BoxFuture<'a, RunOutcome> {
        let tx = self.0.clone();
        async move {
            let _ = tx.send(()).await;
            futures::future::pending().await
        }
        .boxed()
    }
}

#[tokio::test]
async fn an_interrupt_reaches_the_loop_while_tools_run() {
    let tools = ServerTools::resolve(&Selection::All, &catalogue(), None, |_| false).unwrap();
    let (tx, mut started) = tokio::sync::mpsc::channel(1);
    let gw = mock_gateway();
    let lp = ToolLoop::new(gw.clone(), tools, Arc::new(Hangs(tx)), 8);
    let req = mock_request(&ServerTools::default(), "sha256: x");
    let s = lp
        .start(req, CallContext::new("int", crate::llm::Caller::Http))
        .await
        .unwrap();
    let all = tokio::spawn(collect(s));
    started.recv().await.unwrap();
    assert!(
        gw.interrupt("int"),
        "the id is registered while the tool runs"
    );
    let chunks = tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .unwrap()
        .unwrap();
    let last = chunks.last().unwrap();
    assert!(last.interrupted);
    assert_eq!(last.finish_reason.as_deref(), Some("stop"));
    assert_eq!(gw.in_flight(), 0);
}

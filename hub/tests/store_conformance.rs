//! One conformance suite for the three task stores (memory, embedded, Redis): the same cases run
//! against each through `apex_hub::durable::open`. Redis cases use a real `redis-server` on a
//! free port (installed by scripts/test.sh); they fail, never skip, when it is missing.
#![allow(clippy::unwrap_used)]

#[path = "../../tests/src/redis.rs"]
#[allow(dead_code)]
mod redis_server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use apex_hub::durable::{self, Opened, StoreKind};
use apex_hub::model::{EventKind, Task, TaskEvent, TaskSpec, TaskStatus};
use apex_hub::store;
use apex_hub::store::{NodeRecord, Order, TaskFilter};
use redis_server::RedisServer;
use serde_json::json;

fn task(seq: u64, tool: &str, key: Option<&str>) -> Task {
    let spec = TaskSpec {
        tool: tool.to_owned(),
        args: json!({"n": seq}),
        description: Some(format!("task {seq}")),
        priority: 5,
        timeout_seconds: 60.0,
        max_attempts: 3,
        idempotency_key: key.map(str::to_owned),
        pinned_node: None,
        capability: None,
        owner: None,
    };
    Task::accept(uuid_like(seq), seq, spec, SystemTime::now())
}

fn uuid_like(seq: u64) -> String {
    format!("00000000-0000-4000-8000-{seq:012}")
}

fn event(id: &str, seq: u32, kind: EventKind, status: TaskStatus) -> TaskEvent {
    TaskEvent {
        kind,
        task_id: id.to_owned(),
        seq,
        attempt: 0,
        node_id: None,
        status,
        progress: None,
        message: None,
        error: None,
        timestamp: SystemTime::now(),
    }
}

/// Marks a task succeeded at `at`, with its completion event.
fn succeed(t: &mut Task, at: SystemTime) {
    t.status = TaskStatus::Succeeded;
    t.attempt = 1;
    t.node_id = Some("node-a".to_owned());
    t.result = Some(json!({"ok": true}));
    t.finished_at = Some(at);
    t.updated_at = at;
    let seq = t.events.len() as u32 + 1;
    let id = t.id.clone();
    t.events.push(event(
        &id,
        seq,
        EventKind::TaskCompleted,
        TaskStatus::Succeeded,
    ));
}

fn node_record() -> NodeRecord {
    NodeRecord {
        id: "node-a".to_owned(),
        name: "laptop".to_owned(),
        node_type: apex_protocol::NodeType::Worker,
        vcp: false,
        version: Some("1.0".to_owned()),
        tools: vec!["echo".to_owned()],
        tool_specs: vec![apex_protocol::ToolSpec::Name("echo".to_owned())],
        limit: 8,
        cancel_tool: true,
    }
}

/// A store under test: how to open it again.
struct Subject {
    kind: StoreKind,
    dir: PathBuf,
    _redis: Option<RedisServer>,
    _tmp: Option<TempDir>,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let p = std::env::temp_dir().join(format!(
        "apex-store-test-{}-{}",
        std::process::id(),
        uuid_like(rand_u64())
    ));
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

fn rand_u64() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_000_000
}

fn subjects() -> Vec<Subject> {
    let mut out = Vec::new();
    for name in ["memory", "embedded", "redis"] {
        let tmp = tempdir();
        let (kind, redis) = match name {
            "memory" => (StoreKind::Memory, None),
            "embedded" => (StoreKind::Embedded, None),
            _ => {
                let r = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
                (StoreKind::parse(&r.url()).unwrap(), Some(r))
            }
        };
        out.push(Subject {
            kind,
            dir: tmp.0.clone(),
            _redis: redis,
            _tmp: Some(tmp),
        });
    }
    out
}

/// Opens the store, retrying while the previous instance's writer thread still holds the
/// data-directory lock (it lets go when it has flushed).
async fn reopen(kind: &StoreKind, dir: &Path) -> Opened {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match durable::open(kind, dir).await {
            Ok(o) => return o,
            Err(store::Error::Locked { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{kind:?}: {e}"),
        }
    }
}

async fn durable_now(o: &Opened) {
    let d = &o.durability;
    d.wait(d.ticket(), Duration::from_secs(20)).await.unwrap();
}

#[tokio::test]
async fn every_store_keeps_records_indexes_and_events() {
    for s in subjects() {
        let mut o = reopen(&s.kind, &s.dir).await;
        assert!(o.recovered.is_empty(), "{:?}: a new store is empty", s.kind);
        let st = &mut o.store;
        st.insert(task(1, "echo", Some("k1")));
        st.insert(task(2, "sleep", None));
        st.insert(task(3, "echo", None));
        assert!(st.update(&uuid_like(2), &mut |t| succeed(t, SystemTime::now())));
        assert!(!st.update("no-such-task", &mut |_| {}));
        assert_eq!(st.get(&uuid_like(2)).unwrap().status, TaskStatus::Succeeded);
        assert_eq!(
            st.find_by_idempotency_key("k1").as_deref(),
            Some(uuid_like(1).as_str())
        );
        let all = st.list(&TaskFilter::default(), Order::NewestFirst, 1, 10);
        assert_eq!(all.total, 3, "{:?}", s.kind);
        let ids: Vec<u64> = all.tasks.iter().map(|t| t.seq).collect();
        assert_eq!(ids, vec![3, 2, 1], "{:?}: newest first", s.kind);
        let all = st.list(&TaskFilter::default(), Order::OldestFirst, 1, 10);
        let ids: Vec<u64> = all.tasks.iter().map(|t| t.seq).collect();
        assert_eq!(ids, vec![1, 2, 3], "{:?}: oldest first", s.kind);
        let echo_only = TaskFilter {
            tool: Some("echo".to_owned()),
            ..TaskFilter::default()
        };
        let echo = st.list(&echo_only, Order::NewestFirst, 2, 1);
        assert_eq!((echo.total, echo.tasks[0].seq), (2, 1), "{:?}", s.kind);
        let echo = st.list(&echo_only, Order::OldestFirst, 2, 1);
        assert_eq!((echo.total, echo.tasks[0].seq), (2, 3), "{:?}", s.kind);
        let evs = st.events_after(&uuid_like(2), 1);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].kind, EventKind::TaskCompleted);
        let counts = st.counts();
        assert_eq!(counts[TaskStatus::Queued.index()], 2);
        assert_eq!(counts[TaskStatus::Succeeded.index()], 1);
        durable_now(&o).await;
    }
}

#[tokio::test]
async fn durable_stores_give_back_every_task_after_reopening() {
    for s in subjects() {
        let written: Vec<Task> = {
            let mut o = reopen(&s.kind, &s.dir).await;
            for i in 1..=50 {
                o.store.insert(task(i, "echo", None));
            }
            o.store.put_node(node_record());
            for i in (1..=50).step_by(5) {
                o.store
                    .update(&uuid_like(i), &mut |t| succeed(t, SystemTime::now()));
            }
            durable_now(&o).await;
            (1..=50)
                .map(|i| o.store.get(&uuid_like(i)).unwrap().clone())
                .collect()
        };
        let o = reopen(&s.kind, &s.dir).await;
        if s.kind == StoreKind::Memory {
            assert!(o.recovered.is_empty(), "memory keeps nothing");
            continue;
        }
        assert_eq!(
            o.nodes,
            vec![node_record()],
            "{:?}: the registry snapshot",
            s.kind
        );
        let mut got = o.recovered.clone();
        got.sort_by_key(|t| t.seq);
        assert_eq!(got.len(), 50, "{:?}", s.kind);
        for (a, b) in got.iter().zip(&written) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.status, b.status, "{:?}", s.kind);
            assert_eq!(a.result, b.result);
            assert_eq!(a.spec, b.spec);
            assert_eq!(a.events.len(), b.events.len(), "events survive");
            assert_eq!(
                a.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
                b.events.iter().map(|e| e.seq).collect::<Vec<_>>()
            );
        }
    }
}

#[tokio::test]
async fn retention_collects_old_finished_tasks_from_memory_and_store() {
    for s in subjects() {
        {
            let mut o = reopen(&s.kind, &s.dir).await;
            let old = SystemTime::now() - Duration::from_secs(8 * 86_400);
            o.store.insert(task(1, "echo", Some("old")));
            o.store.insert(task(2, "echo", None));
            o.store.insert(task(3, "echo", None));
            o.store.update(&uuid_like(1), &mut |t| succeed(t, old));
            o.store
                .update(&uuid_like(2), &mut |t| succeed(t, SystemTime::now()));
            let cutoff = SystemTime::now() - Duration::from_secs(7 * 86_400);
            assert_eq!(o.store.collect_finished_before(cutoff), 1, "{:?}", s.kind);
            assert!(o.store.get(&uuid_like(1)).is_none());
            assert!(o.store.find_by_idempotency_key("old").is_none());
            assert_eq!(
                o.store
                    .list(&TaskFilter::default(), Order::NewestFirst, 1, 10)
                    .total,
                2
            );
            assert_eq!(o.store.counts().iter().sum::<u64>(), 2);
            durable_now(&o).await;
        }
        if s.kind == StoreKind::Memory {
            continue;
        }
        let o = reopen(&s.kind, &s.dir).await;
        let mut seqs: Vec<u64> = o.recovered.iter().map(|t| t.seq).collect();
        seqs.sort();
        assert_eq!(seqs, vec![2, 3], "{:?}: the collected task is gone", s.kind);
    }
}

#[tokio::test]
async fn a_corrupt_store_stops_the_hub_instead_of_starting_empty() {
    // Embedded: garbage in the database file.
    let tmp = tempdir();
    std::fs::write(
        tmp.0.join(durable::embedded::FILE_NAME),
        b"this is not a redb file".repeat(100),
    )
    .unwrap();
    let Err(e) = durable::open(&StoreKind::Embedded, &tmp.0).await else {
        panic!("a garbage file opened");
    };
    assert!(matches!(e, store::Error::Unreadable { .. }), "{e}");
    assert!(e.to_string().contains("tasks.redb"), "{e}");
    // Redis: a record that does not decode.
    let r = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    {
        let o = reopen(&StoreKind::parse(&r.url()).unwrap(), &tmp.0).await;
        drop(o);
    }
    let client = redis::Client::open(r.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(durable::redis::TASKS_KEY)
        .arg("bad")
        .arg("{not json")
        .query_async(&mut c)
        .await
        .unwrap();
    let Err(e) = durable::open(&StoreKind::parse(&r.url()).unwrap(), &tmp.0).await else {
        panic!("a bad record loaded");
    };
    assert!(matches!(e, store::Error::Unreadable { .. }), "{e}");
}

#[tokio::test]
async fn the_data_directory_is_locked_by_one_hub() {
    let tmp = tempdir();
    let first = reopen(&StoreKind::Embedded, &tmp.0).await;
    let Err(e) = durable::open(&StoreKind::Embedded, &tmp.0).await else {
        panic!("a second hub opened a locked data directory");
    };
    assert!(matches!(e, store::Error::Locked { .. }), "{e}");
    assert!(e.to_string().contains("hub.lock"), "{e}");
    drop(first);
    reopen(&StoreKind::Embedded, &tmp.0).await;
}

#[tokio::test]
async fn redis_down_fails_tickets_and_the_writer_catches_up_when_it_returns() {
    let mut r = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let kind = StoreKind::parse(&r.url()).unwrap();
    let tmp = tempdir();
    let mut o = reopen(&kind, &tmp.0).await;
    o.store.insert(task(1, "echo", None));
    durable_now(&o).await;
    r.stop();
    o.store.insert(task(2, "echo", None));
    let e = o
        .durability
        .wait(o.durability.ticket(), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unavailable"), "{e}");
    assert!(
        o.durability.check().is_err(),
        "the store reports itself failing"
    );
    // Redis comes back empty (no persistence): the writer writes what it holds again.
    r.restart().unwrap();
    o.store.insert(task(3, "echo", None));
    let deadline = Instant::now() + Duration::from_secs(30);
    while o
        .durability
        .wait(o.durability.ticket(), Duration::from_secs(5))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the writer did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(o.durability.check().is_ok());
    drop(o);
    let o = reopen(&kind, &tmp.0).await;
    let mut seqs: Vec<u64> = o.recovered.iter().map(|t| t.seq).collect();
    seqs.sort();
    assert_eq!(
        seqs,
        vec![2, 3],
        "the batches written while Redis was down arrive"
    );
}

#[tokio::test]
async fn one_redis_store_serves_one_hub_and_writes_are_fenced() {
    let r = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let kind = StoreKind::parse(&r.url()).unwrap();
    let (a, b) = (tempdir(), tempdir());
    let mut first = reopen(&kind, &a.0).await;
    first.store.insert(task(1, "echo", None));
    durable_now(&first).await;
    // Another hub (another data directory, so another hub id) steals the lease by force, as
    // if the first hub's lease had expired: the first hub can no longer write.
    let client = redis::Client::open(r.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(durable::redis::OWNER_KEY)
        .arg("hub-intruder")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut c)
        .await
        .unwrap();
    first.store.insert(task(2, "echo", None));
    let e = first
        .durability
        .wait(first.durability.ticket(), Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("owned by hub hub-intruder"), "{e}");
    let n: usize = redis::cmd("HLEN")
        .arg(durable::redis::TASKS_KEY)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1, "a hub without the lease wrote nothing");
    // A second hub cannot open the store while the lease is held (it waits one lifetime).
    let Err(e) = durable::open(&kind, &b.0).await else {
        panic!("a second hub opened an owned Redis store");
    };
    assert!(matches!(e, store::Error::Owned { .. }), "{e}");
}

/// The record store (users, keys, revocations) on a real Redis passes the same suite as memory
/// and redb, and a compare-and-set raced from two connections (two hubs) has one winner.
#[tokio::test]
async fn redis_records_conform_and_compare_and_set_is_atomic_across_connections() {
    let r = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let a = apex_hub::records::RecordStore::redis(&r.url())
        .await
        .unwrap();
    let b = apex_hub::records::RecordStore::redis(&r.url())
        .await
        .unwrap();
    apex_hub::records::conformance::check(&a).await;
    apex_hub::records::conformance::check_race(&a, &b).await;
    apex_hub::records::conformance::check_log_race(&a, &b).await;
    a.put("conf_seen", "k", b"from a", None).await.unwrap();
    assert_eq!(
        b.get("conf_seen", "k").await.unwrap().as_deref(),
        Some(&b"from a"[..]),
        "a record written through one hub is read through another"
    );
}

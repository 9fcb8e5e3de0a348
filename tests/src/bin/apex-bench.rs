//! `apex-bench`: measures the cluster core on one machine: end-to-end no-op throughput,
//! submit→result latency at half of the measured peak, SIGKILL and SIGSTOP detection times,
//! and the time from detection to re-dispatch. Prints a table. Not a test: nothing here fails
//! on a slow number.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apex_tests::stats::{ms, parse_rfc3339_ms, percentile};
use apex_tests::{Api, Hub, HubOptions, Node, NodeOptions, RedisServer, Task};
use clap::{Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[path = "apex-bench/chat.rs"]
mod chat;
#[path = "apex-bench/limits.rs"]
mod limits;
#[path = "apex-bench/llm.rs"]
mod llm;
#[path = "apex-bench/memory.rs"]
mod memory;
#[path = "apex-bench/plugins.rs"]
mod plugins;
#[path = "apex-bench/research.rs"]
mod research;
#[path = "apex-bench/tool_hop.rs"]
mod tool_hop;

/// Which measurements to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// Cluster core: throughput, latency, failure detection, re-dispatch.
    Core,
    /// LLM gateway: latency the hub adds over the upstream, saturation, RSS with open streams.
    Llm,
    /// Task stores: throughput and latency with memory, embedded and Redis stores and with two
    /// hubs sharing one Redis (`shared`); recovery time after SIGKILL with `--recovery-tasks`
    /// queued tasks.
    Store,
    /// Rate limits: the limiter's cost per check in process and on Redis, and the gateway's
    /// latency at c=16 with limits off and on (in memory, and in Redis in shared mode).
    Limits,
    /// Plugins: `--plugin-calls` stdio plugin runs on one node, a fraction of them killed at
    /// their manifest's timeout; runs/s, latency, and processes, zombies and fds left behind.
    Plugins,
    /// Server-side tools: the hub → node → hub hop of one tool call of a chat completion,
    /// excluding model time (the built-in mock model), with the embedded and memory stores.
    ToolHop,
    /// Conversations: the store's bytes for a session of `--chat-turns` turns against the raw
    /// message bytes (embedded and Redis), and the turn latency with the mock model.
    Chat,
    /// Memory search: the chat hook's cost on a turn's hot path, turn latency with memory on
    /// and off, and query p50/p99 over `--memory-messages` stored messages.
    Memory,
    /// Research engine: its own time per DAG node (`apex_research_step_overhead_seconds`,
    /// model time excluded) over a plan of 1,000 and then 10,000 `agent.run` tasks against a
    /// fake upstream with no delays (only `--research-tasks` when given); wall time, tasks/s,
    /// groups, the hub's CPU and RSS.
    Research,
}

/// Benchmarks a local apex cluster (hub + K nodes running the no-op tool) and prints a table.
///
/// Binaries are taken from $APEX_BIN_DIR, else from the directory of this executable; use a
/// release build (scripts/bench.sh does).
#[derive(Debug, Parser)]
#[command(name = "apex-bench", version)]
struct Args {
    /// Suite to run.
    #[arg(value_enum, default_value_t = Suite::Core)]
    suite: Suite,
    /// No-op tasks for the throughput run.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    tasks: usize,
    /// Node processes running the no-op tool.
    #[arg(long, short = 'k', default_value_t = 2)]
    nodes: usize,
    /// Tasks each node runs at once.
    #[arg(long, default_value_t = 1024)]
    node_concurrency: u32,
    /// Batch submits (of up to 1,000 tasks) in flight at once during the throughput run.
    #[arg(long, short = 'c', default_value_t = 4)]
    concurrency: usize,
    /// Tasks per batch submit.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Closed-loop clients measuring the single-submit peak.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Single-task submits measured for latency.
    #[arg(long, default_value_t = 5000)]
    latency_samples: usize,
    /// Open-loop rate of the latency run, tasks/s [default: half the measured single-submit
    /// peak].
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Skip the SIGKILL/SIGSTOP measurements.
    #[arg(long)]
    skip_failover: bool,
    /// llm and limits suites: requests per latency measurement (each concurrency level and
    /// path).
    #[arg(long, default_value_t = 4000)]
    llm_samples: usize,
    /// llm suite: seconds of each saturation run.
    #[arg(long, default_value_t = 5)]
    llm_saturation_secs: u64,
    /// llm suite: concurrent open streams for the RSS figure.
    #[arg(long, default_value_t = 1000)]
    llm_streams: usize,
    /// llm and limits suites: worker threads of the load generator (this process) and of the fake upstream.
    /// One each by default, so that on a small machine the two instruments do not
    /// oversubscribe the cores the hub is measured on (with one worker per core each, three
    /// processes contend for 2 cores and the figures measure that contention). Both paths,
    /// direct and via the hub, use the same instruments. 0: one per CPU.
    #[arg(long, default_value_t = 1)]
    llm_instrument_threads: usize,
    /// limits suite: in-process checks per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    limits_checks: usize,
    /// limits suite: checks on Redis per measurement.
    #[arg(long, default_value_t = 20_000)]
    limits_redis_checks: usize,
    /// tool-hop suite: measured chat completions (one tool call each) per store.
    #[arg(long, default_value_t = 2000)]
    tool_hop_samples: usize,
    /// `chat`: turns of the measured session.
    #[arg(long, default_value_t = 1000)]
    chat_turns: usize,
    /// `memory`: messages stored before the queries.
    #[arg(long, default_value_t = 100_000)]
    memory_messages: usize,
    /// `memory`: sessions the messages are sent in at once.
    #[arg(long, default_value_t = 16)]
    memory_sessions: usize,
    /// `memory`: queries measured.
    #[arg(long, default_value_t = 2000)]
    memory_queries: usize,
    /// `memory`: turns measured with memory on and off.
    #[arg(long, default_value_t = 2000)]
    memory_turns: usize,
    /// `memory`: in-process chat-hook calls measured.
    #[arg(long, default_value_t = 100_000)]
    memory_hook_calls: usize,
    /// Store suite: queued tasks in the hub killed for the recovery measurement (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    recovery_tasks: usize,
    /// Store suite: which stores to measure, comma-separated (`shared`: two hubs in shared
    /// mode on one Redis, `--nodes` spread over them, batches submitted at both).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "memory,embedded,redis,shared"
    )]
    stores: Vec<String>,
    /// plugins suite: plugin calls in all.
    #[arg(long, default_value_t = 10_000)]
    plugin_calls: usize,
    /// plugins suite: fraction of the calls that hang until their timeout (300 ms).
    #[arg(long, default_value_t = 0.1)]
    plugin_timeout_fraction: f64,
    /// plugins suite: plugin runs the node runs at once.
    #[arg(long, default_value_t = 32)]
    plugin_concurrency: u32,
    /// `research`: tasks in the plan (1 to 20000). Given: only that size runs; not given:
    /// 1000, then 10000.
    #[arg(long)]
    research_tasks: Option<usize>,
    /// `research`: node processes running `agent.run`.
    #[arg(long, default_value_t = 4)]
    research_nodes: usize,
    /// `research`: `--max-concurrent-tasks` of each node.
    #[arg(long, default_value_t = 128)]
    research_node_concurrency: u32,
}

/// One row of the result table.
struct Row {
    metric: String,
    value: String,
    target: &'static str,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if matches!(args.suite, Suite::Llm | Suite::Limits) && args.llm_instrument_threads > 0 {
        rt.worker_threads(args.llm_instrument_threads);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apex-bench: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(rows) => {
            print_table(&rows);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("apex-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<Vec<Row>> {
    if args.suite == Suite::Llm {
        return llm::run(&llm::LlmArgs {
            samples: args.llm_samples.max(2),
            saturation_secs: args.llm_saturation_secs.max(1),
            streams: args.llm_streams,
            instrument_threads: args.llm_instrument_threads,
        })
        .await;
    }
    if args.suite == Suite::Limits {
        return limits::run(&limits::LimitsArgs {
            checks: args.limits_checks,
            redis_checks: args.limits_redis_checks,
            samples: args.llm_samples.max(2),
            instrument_threads: args.llm_instrument_threads,
        })
        .await;
    }
    if args.suite == Suite::Plugins {
        return plugins::run(&plugins::PluginArgs {
            calls: args.plugin_calls,
            timeout_fraction: args.plugin_timeout_fraction,
            concurrency: args.plugin_concurrency,
        })
        .await;
    }
    if args.suite == Suite::Chat {
        return chat::run(&chat::ChatArgs {
            turns: args.chat_turns.max(1),
        })
        .await;
    }
    if args.suite == Suite::Memory {
        return memory::run(&memory::MemoryArgs {
            messages: args.memory_messages.max(2),
            sessions: args.memory_sessions.max(1),
            queries: args.memory_queries.max(1),
            turns: args.memory_turns.max(1),
            hook_calls: args.memory_hook_calls.max(1),
        })
        .await;
    }
    if args.suite == Suite::Research {
        return research::run(&research::ResearchArgs {
            sizes: args
                .research_tasks
                .map_or_else(|| vec![1000, 10_000], |n| vec![n]),
            nodes: args.research_nodes,
            node_concurrency: args.research_node_concurrency.max(1),
        })
        .await;
    }
    if args.suite == Suite::ToolHop {
        return tool_hop::run(&tool_hop::ToolHopArgs {
            samples: args.tool_hop_samples.max(2),
        })
        .await;
    }
    if args.nodes == 0 || args.batch == 0 || args.batch > 1000 {
        bail!("need --nodes >= 1 and 1 <= --batch <= 1000");
    }
    if args.suite == Suite::Store {
        return store_suite(&args).await;
    }
    let mut rows = Vec::new();
    // Default liveness settings (ping 1000 ms, dead after 3000 ms): the SIGSTOP figure is
    // measured against them.
    let hub = Hub::start(HubOptions::default()).await?;
    let api = hub.api().clone();
    eprintln!("hub {} (pid {})", hub.url(), hub.pid());
    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        let n = Node::start(
            &hub,
            NodeOptions::named(&format!("bench-{i}")).concurrency(args.node_concurrency),
        )
        .await?;
        nodes.push(n);
    }

    eprintln!("warming up");
    let warm = args.tasks.clamp(1, 2000);
    throughput(&api, warm, args.batch, args.concurrency).await?;

    eprintln!("throughput: {} noop tasks", args.tasks);
    let (peak, submit_rate) = throughput(&api, args.tasks, args.batch, args.concurrency).await?;
    rows.push(Row {
        metric: format!(
            "end-to-end throughput ({} noop tasks, {} nodes)",
            args.tasks, args.nodes
        ),
        value: format!("{peak:.0} tasks/s"),
        target: ">= 20000 tasks/s",
    });
    rows.push(Row {
        metric: "  of which submit (batch accept) rate".into(),
        value: format!("{submit_rate:.0} tasks/s"),
        target: "",
    });

    // Half load is measured against the peak of the path the latency run uses: one task per
    // request plus a long-poll for its result (batches are far cheaper per task).
    eprintln!(
        "single-submit peak: {} closed-loop clients for 2 s",
        args.clients
    );
    let single_peak = single_peak(&api, args.clients, Duration::from_secs(2)).await?;
    rows.push(Row {
        metric: format!(
            "single-submit peak ({} clients, submit + long-poll each)",
            args.clients
        ),
        value: format!("{single_peak:.0} tasks/s"),
        target: "",
    });
    let rate = args
        .latency_rate
        .unwrap_or(single_peak.min(peak) / 2.0)
        .max(1.0);
    eprintln!(
        "latency: {} single submits at {rate:.0}/s",
        args.latency_samples
    );
    let (lat, achieved) = latency(&api, args.latency_samples, rate).await?;
    let pick = |p: f64| percentile(&lat, p).map(ms).unwrap_or_else(|| "n/a".into());
    rows.push(Row {
        metric: format!("submit->result p50 @ {achieved:.0} tasks/s (open loop)"),
        value: pick(50.0),
        target: "",
    });
    rows.push(Row {
        metric: "submit->result p99".into(),
        value: pick(99.0),
        target: "<= 5 ms",
    });
    rows.push(Row {
        metric: "submit->result p99.9".into(),
        value: pick(99.9),
        target: "",
    });

    if !args.skip_failover {
        eprintln!("failover: SIGKILL");
        let f = failover(&hub, Fault::Kill, args.node_concurrency).await?;
        rows.push(Row {
            metric: "SIGKILL detection (kill -> hub marks node offline, hub clock)".into(),
            value: f.hub_ms(),
            target: "<= 100 ms",
        });
        rows.push(Row {
            metric: "SIGKILL: kill -> offline seen (client, 5 ms polls)".into(),
            value: ms(f.detection),
            target: "",
        });
        rows.extend(f.redispatch_rows("SIGKILL"));
        eprintln!("failover: SIGSTOP (liveness 1000/3000 ms)");
        let f = failover(&hub, Fault::Stop, args.node_concurrency).await?;
        rows.push(Row {
            metric: "SIGSTOP detection (stop -> hub marks node offline, hub clock), 1000/3000 ms"
                .into(),
            value: f.hub_ms(),
            target: "<= 3 s",
        });
        rows.push(Row {
            metric: "SIGSTOP: stop -> offline seen (client, 5 ms polls)".into(),
            value: ms(f.detection),
            target: "",
        });
        rows.extend(f.redispatch_rows("SIGSTOP"));
    }
    drop(nodes);
    Ok(rows)
}

/// The store suite: for each store, no-op throughput and open-loop latency; then recovery time
/// of an embedded-store hub SIGKILLed with `recovery_tasks` queued tasks.
async fn store_suite(args: &Args) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for store in &args.stores {
        let store = store.as_str();
        if store.is_empty() {
            continue;
        }
        if !matches!(store, "memory" | "embedded" | "redis" | "shared") {
            bail!("--stores takes memory, embedded, redis and shared, not {store:?}");
        }
        if store == "shared" {
            rows.extend(shared_suite(args).await?);
            continue;
        }
        let redis = match store {
            "redis" => Some(RedisServer::start().map_err(anyhow::Error::msg)?),
            _ => None,
        };
        let flag = redis.as_ref().map_or(store.to_owned(), RedisServer::url);
        let hub = Hub::start(HubOptions {
            extra_args: vec!["--store".into(), flag],
            ..HubOptions::default()
        })
        .await?;
        eprintln!("{store}: hub {} (pid {})", hub.url(), hub.pid());
        let api = hub.api().clone();
        let mut nodes = Vec::new();
        for i in 1..=args.nodes {
            nodes.push(
                Node::start(
                    &hub,
                    NodeOptions::named(&format!("bench-{i}")).concurrency(args.node_concurrency),
                )
                .await?,
            );
        }
        eprintln!("{store}: warming up");
        throughput(
            &api,
            args.tasks.clamp(1, 2000),
            args.batch,
            args.concurrency,
        )
        .await?;
        eprintln!("{store}: throughput, {} noop tasks", args.tasks);
        let (peak, submit_rate) =
            throughput(&api, args.tasks, args.batch, args.concurrency).await?;
        let target = match store {
            "embedded" => ">= 10000 tasks/s",
            "redis" => ">= 5000 tasks/s",
            _ => "",
        };
        rows.push(Row {
            metric: format!("{store}: end-to-end throughput ({} noop tasks)", args.tasks),
            value: format!("{peak:.0} tasks/s"),
            target,
        });
        rows.push(Row {
            metric: format!("{store}:   of which submit (batch accept) rate"),
            value: format!("{submit_rate:.0} tasks/s"),
            target: "",
        });
        let rate = args.latency_rate.unwrap_or(1000.0);
        eprintln!(
            "{store}: latency, {} single submits at {rate:.0}/s",
            args.latency_samples
        );
        let (lat, achieved) = latency(&api, args.latency_samples, rate).await?;
        let pick = |p: f64| percentile(&lat, p).map(ms).unwrap_or_else(|| "n/a".into());
        rows.push(Row {
            metric: format!("{store}: submit->result p50 @ {achieved:.0} tasks/s (open loop)"),
            value: pick(50.0),
            target: "",
        });
        rows.push(Row {
            metric: format!("{store}: submit->result p99"),
            value: pick(99.0),
            target: "",
        });
        drop(nodes);
        drop(hub);
    }

    let n = args.recovery_tasks;
    if n == 0 {
        return Ok(rows);
    }
    eprintln!("recovery: {n} queued tasks in an embedded-store hub, SIGKILL, restart");
    let mut hub = Hub::start(HubOptions {
        extra_args: vec!["--store".into(), "embedded".into()],
        ..HubOptions::default()
    })
    .await?;
    let bodies: Vec<Value> = (0..n).map(|_| json!({"tool": "noop"})).collect();
    futures::stream::iter(bodies.chunks(1000).map(|c| hub.api().submit_batch(c)))
        .buffer_unordered(4)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let start = Instant::now();
    hub.kill_and_restart().await?;
    let listening = start.elapsed();
    let api = hub.api().clone();
    loop {
        if let Ok(h) = api.health().await
            && h["tasks"]["queued"].as_u64() == Some(n as u64)
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("{n} queued tasks not back within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let recovered = start.elapsed();
    rows.push(Row {
        metric: format!("recovery after SIGKILL, {n} queued tasks (restart -> /health shows all)"),
        value: ms(recovered),
        target: "<= 2 s",
    });
    rows.push(Row {
        metric: "  of which restart -> `listening on` printed".into(),
        value: ms(listening),
        target: "",
    });
    Ok(rows)
}

/// Shared mode: two hubs on one Redis (`--hub-mode shared`), `--nodes` nodes spread over them
/// (node i at hub i mod 2). Throughput: batches submitted alternately at both hubs, finished
/// tasks counted over both hubs' `/health`. Latency: open-loop single submits alternately at
/// both hubs; each task is read back (long poll) at the hub that accepted it, and its latency
/// runs from the scheduled send time to the `finished_at` the shared record carries (hub
/// clock, same machine), because a hub reads a task another hub ran by polling the shared
/// record, which would add its poll interval to the figure.
async fn shared_suite(args: &Args) -> Result<Vec<Row>> {
    let redis = RedisServer::start().map_err(anyhow::Error::msg)?;
    let shared_args = vec![
        "--store".into(),
        redis.url(),
        "--hub-mode".into(),
        "shared".into(),
    ];
    let a = Hub::start(HubOptions {
        extra_args: shared_args.clone(),
        ..HubOptions::default()
    })
    .await?;
    let b = Hub::start(HubOptions {
        extra_args: shared_args,
        data_dir: None,
        ..a.options().clone()
    })
    .await?;
    eprintln!(
        "shared: hubs {} (pid {}) and {} (pid {}) on {}",
        a.url(),
        a.pid(),
        b.url(),
        b.pid(),
        redis.url()
    );
    let mut nodes = Vec::new();
    for i in 1..=args.nodes.max(2) {
        let hub = if i % 2 == 1 { &a } else { &b };
        nodes.push(
            Node::start(
                hub,
                NodeOptions::named(&format!("bench-{i}")).concurrency(args.node_concurrency),
            )
            .await?,
        );
    }
    let apis = [a.api().clone(), b.api().clone()];
    eprintln!("shared: warming up");
    shared_throughput(
        &apis,
        args.tasks.clamp(1, 2000),
        args.batch,
        args.concurrency,
    )
    .await?;
    eprintln!(
        "shared: throughput, {} noop tasks submitted at both hubs",
        args.tasks
    );
    let (peak, submit_rate) =
        shared_throughput(&apis, args.tasks, args.batch, args.concurrency).await?;
    let mut rows = vec![
        Row {
            metric: format!(
                "shared (2 hubs, {} nodes): end-to-end throughput ({} noop tasks)",
                nodes.len(),
                args.tasks
            ),
            value: format!("{peak:.0} tasks/s"),
            target: ">= 5000 tasks/s",
        },
        Row {
            metric: "shared:   of which submit (batch accept) rate".into(),
            value: format!("{submit_rate:.0} tasks/s"),
            target: "",
        },
    ];
    let rate = args.latency_rate.unwrap_or(1000.0);
    eprintln!(
        "shared: latency, {} single submits at {rate:.0}/s alternately at both hubs",
        args.latency_samples
    );
    let (lat, achieved) = shared_latency(&apis, args.latency_samples, rate).await?;
    let pick = |p: f64| {
        percentile(&lat, p)
            .map(|v| format!("{v} ms"))
            .unwrap_or_else(|| "n/a".into())
    };
    rows.push(Row {
        metric: format!("shared: submit->completed p50 @ {achieved:.0} tasks/s (open loop)"),
        value: pick(50.0),
        target: "",
    });
    rows.push(Row {
        metric: "shared: submit->completed p99".into(),
        value: pick(99.0),
        target: "",
    });
    drop(nodes);
    drop((a, b));
    Ok(rows)
}

/// [`throughput`] over several hubs: batches go to each hub in turn; done when the hubs'
/// finished counts together grew by `n`.
async fn shared_throughput(
    apis: &[Api],
    n: usize,
    batch: usize,
    in_flight: usize,
) -> Result<(f64, f64)> {
    let total_finished = || async {
        let mut sum = 0;
        for api in apis {
            sum += finished(api).await?;
        }
        Ok::<_, anyhow::Error>(sum)
    };
    let base = total_finished().await?;
    let bodies: Vec<Value> = (0..n).map(|_| json!({"tool": "noop"})).collect();
    let start = Instant::now();
    let submit = async {
        futures::stream::iter(
            bodies
                .chunks(batch)
                .enumerate()
                .map(|(i, c)| apis[i % apis.len()].submit_batch(c)),
        )
        .buffer_unordered(in_flight.max(1))
        .try_for_each(|_| async { Ok(()) })
        .await?;
        Ok::<_, anyhow::Error>(start.elapsed())
    };
    let wait_done = async {
        let deadline = start + Duration::from_secs(600);
        loop {
            if total_finished().await? >= base + n as u64 {
                return Ok::<_, anyhow::Error>(start.elapsed());
            }
            if Instant::now() > deadline {
                bail!("{n} tasks not finished after 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (submitted, done) = tokio::try_join!(submit, wait_done)?;
    let failed = apis[0]
        .list(&[("status", "failed"), ("limit", "1")])
        .await?
        .meta
        .total;
    if failed > 0 {
        bail!("{failed} noop tasks failed");
    }
    Ok((
        n as f64 / done.as_secs_f64(),
        n as f64 / submitted.as_secs_f64(),
    ))
}

/// Open-loop latency over several hubs (see [`shared_suite`]): sorted latencies in whole
/// milliseconds (the resolution of `finished_at`) and the achieved rate.
async fn shared_latency(apis: &[Api], samples: usize, rate: f64) -> Result<(Vec<i64>, f64)> {
    let start = Instant::now();
    let wall0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?;
    let mut handles = Vec::with_capacity(samples);
    for i in 0..samples {
        let offset = Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until((start + offset).into()).await;
        let api = apis[i % apis.len()].clone();
        let sent_ms = (wall0 + offset).as_millis() as i64;
        handles.push(tokio::spawn(async move {
            let mut t = api.submit(&json!({"tool": "noop"})).await?;
            while !t.is_terminal() {
                t = api.get_wait(&t.task_id, 5000).await?;
            }
            if t.status != "succeeded" {
                bail!("noop task {} ended {}", t.task_id, t.status);
            }
            let done = t
                .finished_at
                .as_deref()
                .and_then(parse_rfc3339_ms)
                .with_context(|| format!("task {} has no finished_at", t.task_id))?;
            Ok::<_, anyhow::Error>(done - sent_ms)
        }));
    }
    let sent = start.elapsed();
    let mut v = Vec::with_capacity(samples);
    for h in handles {
        v.push(h.await??);
    }
    v.sort_unstable();
    Ok((v, samples as f64 / sent.as_secs_f64().max(1e-9)))
}

/// Finished (terminal) tasks according to `/health`.
async fn finished(api: &Api) -> Result<u64> {
    let h = api.health().await?;
    let t = &h["tasks"];
    Ok(["succeeded", "failed", "cancelled", "timed_out"]
        .iter()
        .map(|k| t[*k].as_u64().unwrap_or(0))
        .sum())
}

/// Submits `n` noop tasks in batches, `in_flight` batches at a time, and waits until all are
/// finished. Returns (end-to-end tasks/s, submit tasks/s).
async fn throughput(api: &Api, n: usize, batch: usize, in_flight: usize) -> Result<(f64, f64)> {
    let base = finished(api).await?;
    let bodies: Vec<Value> = (0..n).map(|_| json!({"tool": "noop"})).collect();
    let start = Instant::now();
    let submit = async {
        futures::stream::iter(bodies.chunks(batch).map(|c| api.submit_batch(c)))
            .buffer_unordered(in_flight.max(1))
            .try_for_each(|_| async { Ok(()) })
            .await?;
        Ok::<_, anyhow::Error>(start.elapsed())
    };
    let wait_done = async {
        let deadline = start + Duration::from_secs(600);
        loop {
            if finished(api).await? >= base + n as u64 {
                return Ok::<_, anyhow::Error>(start.elapsed());
            }
            if Instant::now() > deadline {
                bail!("{n} tasks not finished after 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (submitted, done) = tokio::try_join!(submit, wait_done)?;
    let failed = api
        .list(&[("status", "failed"), ("limit", "1")])
        .await?
        .meta
        .total;
    if failed > 0 {
        bail!("{failed} noop tasks failed");
    }
    Ok((
        n as f64 / done.as_secs_f64(),
        n as f64 / submitted.as_secs_f64(),
    ))
}

/// Closed loop: `clients` workers each submit one task and long-poll its result, again and
/// again, for `dur`. Returns finished tasks/s.
async fn single_peak(api: &Api, clients: usize, dur: Duration) -> Result<f64> {
    let start = Instant::now();
    let deadline = start + dur;
    let workers = (0..clients.max(1)).map(|_| {
        let api = api.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let mut t = api.submit(&json!({"tool": "noop"})).await?;
                while !t.is_terminal() {
                    t = api.get_wait(&t.task_id, 5000).await?;
                }
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        })
    });
    let mut total = 0;
    for w in futures::future::join_all(workers).await {
        total += w??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Open-loop latency: one single-task submit every 1/rate s, each followed by a `?wait_ms`
/// long-poll; latency runs from the scheduled send time to the terminal answer. Returns the
/// sorted latencies and the achieved rate.
async fn latency(api: &Api, samples: usize, rate: f64) -> Result<(Vec<Duration>, f64)> {
    let out = Arc::new(Mutex::new(Vec::with_capacity(samples)));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(samples);
    for i in 0..samples {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        let api = api.clone();
        let out = out.clone();
        handles.push(tokio::spawn(async move {
            let task = api.submit(&json!({"tool": "noop"})).await?;
            let mut t = task;
            while !t.is_terminal() {
                t = api.get_wait(&t.task_id, 5000).await?;
            }
            if t.status != "succeeded" {
                bail!("noop task {} ended {}", t.task_id, t.status);
            }
            out.lock().await.push(at.elapsed());
            Ok::<_, anyhow::Error>(())
        }));
    }
    let sent = start.elapsed();
    for h in handles {
        h.await??;
    }
    let mut v = std::mem::take(&mut *out.lock().await);
    v.sort_unstable();
    Ok((v, samples as f64 / sent.as_secs_f64().max(1e-9)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
}

/// Failover measurements.
struct Failover {
    /// Fault → node seen offline by the client (5 ms polls).
    detection: Duration,
    /// Fault → the hub's `disconnected_at` for the node (wall clock, millisecond timestamps):
    /// the detection itself, without the client's polling delay.
    detection_hub_ms: Option<i64>,
    /// Detection seen by the client → last victim task seen re-assigned (client clock).
    redispatch_client: Option<Duration>,
    /// `task_migrated` → attempt-2 `task_assigned`, worst over the victim's tasks (hub clock,
    /// millisecond timestamps).
    redispatch_hub_ms: Option<i64>,
    moved: usize,
}

impl Failover {
    fn hub_ms(&self) -> String {
        self.detection_hub_ms
            .map(|v| format!("{v} ms"))
            .unwrap_or_else(|| "n/a".into())
    }

    fn redispatch_rows(&self, what: &str) -> Vec<Row> {
        vec![
            Row {
                metric: format!(
                    "{what}: detection -> re-dispatch, hub events (worst of {} tasks)",
                    self.moved
                ),
                value: self
                    .redispatch_hub_ms
                    .map(|v| format!("{v} ms"))
                    .unwrap_or_else(|| "n/a".into()),
                target: "<= 50 ms",
            },
            Row {
                metric: format!(
                    "{what}: offline seen -> all re-assigned seen (client, 5 ms polls)"
                ),
                value: self
                    .redispatch_client
                    .map(ms)
                    .unwrap_or_else(|| "n/a".into()),
                target: "",
            },
        ]
    }
}

/// Starts a victim node (as wide as the others, so it gets its share), gives the cluster sleep tasks so the victim has work in flight,
/// applies the fault and measures detection and re-dispatch.
async fn failover(hub: &Hub, fault: Fault, concurrency: u32) -> Result<Failover> {
    let api = hub.api();
    let name = format!(
        "victim-{}",
        if fault == Fault::Kill { "kill" } else { "stop" }
    );
    let mut victim = Node::start(hub, NodeOptions::named(&name).concurrency(concurrency)).await?;
    let vid = victim.id().to_owned();

    let bodies: Vec<Value> = (0..48)
        .map(|_| json!({"tool": "sleep", "args": {"ms": 1500}}))
        .collect();
    let ids: Vec<String> = api.submit_ids(&bodies).await?;
    let on_victim = apex_tests::wait_until(
        "the victim to have tasks in flight",
        Duration::from_secs(20),
        || async {
            // Snapshot once every task is dispatched, so the victim holds its full share.
            if api
                .list(&[("status", "queued"), ("limit", "1")])
                .await?
                .meta
                .total
                > 0
            {
                return Ok(None);
            }
            let mut v = Vec::new();
            for status in ["assigned", "running"] {
                v.extend(
                    api.list_all(&[("node_id", vid.as_str()), ("status", status)])
                        .await?,
                );
            }
            Ok((!v.is_empty()).then_some(v))
        },
    )
    .await?;

    let fault_wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let t0 = Instant::now();
    match fault {
        Fault::Kill => victim.kill()?,
        Fault::Stop => victim.freeze()?,
    }
    let detection = loop {
        match api.node(&vid).await? {
            Some(n) if n.status == "online" || n.status == "draining" => {}
            _ => break t0.elapsed(),
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("{name} still online 60 s after the fault");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let detected_at = Instant::now();
    let detection_hub_ms = api
        .node(&vid)
        .await?
        .and_then(|n| {
            n.extra
                .get("disconnected_at")
                .and_then(|v| v.as_str())
                .and_then(parse_rfc3339_ms)
        })
        .map(|at| at - fault_wall_ms);

    // Client view: when does every victim task show a later attempt on another node?
    let victim_ids: Vec<String> = on_victim.iter().map(|t| t.task_id.clone()).collect();
    let mut pending: Vec<String> = victim_ids.clone();
    let mut redispatch_client = None;
    while !pending.is_empty() && detected_at.elapsed() < Duration::from_secs(30) {
        let now: Vec<Task> =
            futures::future::try_join_all(pending.iter().map(|id| api.get(id))).await?;
        pending = now
            .into_iter()
            .filter(|t| {
                !(t.is_terminal() || (t.attempt >= 2 && t.node_id.as_deref() != Some(vid.as_str())))
            })
            .map(|t| t.task_id)
            .collect();
        if pending.is_empty() {
            redispatch_client = Some(detected_at.elapsed());
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Hub view, from the event streams once the tasks are done.
    api.wait_all_terminal(&ids, Duration::from_secs(60), 16)
        .await?;
    let mut worst: Option<i64> = None;
    let mut moved = 0;
    for id in &victim_ids {
        let events = api.events(id, Duration::from_secs(20)).await?;
        let ts = |e: &Value| e["timestamp"].as_str().and_then(parse_rfc3339_ms);
        let migrated = events
            .iter()
            .find(|e| e["type"] == "task_migrated")
            .and_then(ts);
        let reassigned = events
            .iter()
            .find(|e| e["type"] == "task_assigned" && e["attempt"].as_u64().unwrap_or(0) >= 2)
            .and_then(ts);
        if let (Some(m), Some(a)) = (migrated, reassigned) {
            moved += 1;
            worst = Some(worst.map_or(a - m, |w: i64| w.max(a - m)));
        }
    }
    if fault == Fault::Stop {
        victim.thaw().context("thawing the victim")?;
    }
    drop(victim);
    Ok(Failover {
        detection,
        detection_hub_ms,
        redispatch_client,
        redispatch_hub_ms: worst,
        moved,
    })
}

fn print_table(rows: &[Row]) {
    let w0 = rows
        .iter()
        .map(|r| r.metric.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let w1 = rows.iter().map(|r| r.value.len()).max().unwrap_or(5).max(5);
    println!();
    println!("| {:w0$} | {:>w1$} | target |", "metric", "value");
    println!(
        "|{}|{}|{}|",
        "-".repeat(w0 + 2),
        "-".repeat(w1 + 2),
        "-".repeat(18)
    );
    for r in rows {
        println!("| {:w0$} | {:>w1$} | {} |", r.metric, r.value, r.target);
    }
}

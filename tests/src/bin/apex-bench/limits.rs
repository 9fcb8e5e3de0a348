//! The `limits` suite: what the rate limits cost.
//!
//! - The limiter alone (`apex_hub::limits::Limiter::check`, the call the middleware makes):
//!   in process (memory buckets) on one thread, one caller and 10,000 callers, and on two
//!   threads at once; then on a real `redis-server` (started like the store suite's), one
//!   check at a time and 16 at once. Every check is admitted (limits far above the load), so
//!   this is the cost of counting, not of refusing.
//! - The gateway with limits off and on, at concurrency 1 and 16 (with the hubs' CPU per
//!   request at 16, where this machine is saturated): non-stream chat completions
//!   through a hub in front of the fake upstream (the `llm` suite's pieces): a hub alone with
//!   `rate_limits.enabled = false` against one with limits on for its (admin) key, counted in
//!   memory; and the same two in shared mode on one Redis (limits counted in Redis), so the
//!   difference is the limits, not shared mode. The two paths of a pair are interleaved in
//!   halves like the `llm` suite does. "Added" is the on figure minus the off figure.
//!
//! The in-process figures run in this process, whose allocator is the system's (the hub's
//! binary uses mimalloc).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use apex_hub::limits::{Admission, Limiter, RateLimits, RouteClass};
use apex_hub::principal::{Principal, PrincipalKind};
use apex_tests::stats::{ms, percentile};
use apex_tests::{Hub, HubOptions, RedisServer};

use super::Row;
use super::llm::{Target, closed_loop, cpu_ticks, start_fake};

/// Settings of the suite (from the command line).
pub(crate) struct LimitsArgs {
    /// Checks per in-process measurement.
    pub checks: usize,
    /// Checks per Redis measurement.
    pub redis_checks: usize,
    /// Requests per gateway measurement (each path).
    pub samples: usize,
    /// Worker threads of the fake upstream (0: one per CPU).
    pub instrument_threads: usize,
}

/// Limits that admit every check of the suite, counted for the admin key too.
fn generous() -> RateLimits {
    RateLimits {
        apply_to_admin: true,
        standard_per_minute: RateLimits::MAX_PER_MINUTE,
        llm_requests_per_minute: RateLimits::MAX_PER_MINUTE,
        llm_tokens_per_minute: RateLimits::MAX_PER_MINUTE,
        ..RateLimits::default()
    }
}

fn caller(i: usize) -> Principal {
    Principal {
        id: format!("key:bench-{i}"),
        kind: PrincipalKind::Key,
        scopes: Vec::new(),
        credential: None,
        rate_limit: None,
    }
}

fn ns_per(d: Duration, n: usize) -> String {
    format!("{:.0} ns", d.as_nanos() as f64 / n.max(1) as f64)
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

/// `n` in-process checks over `callers` callers on this thread; the elapsed time.
fn memory_run(l: &Limiter, callers: &[Principal], n: usize) -> Result<Duration> {
    let start = Instant::now();
    for i in 0..n {
        let p = &callers[i % callers.len()];
        // The memory path never waits: its future is ready at the first poll.
        match futures::executor::block_on(l.check(p, RouteClass::Standard)) {
            Admission::Admitted(_) => {}
            other => bail!("check {i} not admitted: {other:?}"),
        }
    }
    Ok(start.elapsed())
}

/// Runs the suite and returns its table rows.
pub(crate) async fn run(args: &LimitsArgs) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let n = args.checks.max(1);

    eprintln!("in process: {n} checks per run");
    let memory = tokio::task::spawn_blocking(move || -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        let one = vec![caller(0)];
        let many: Vec<Principal> = (0..10_000).map(caller).collect();
        let l = Limiter::memory(generous());
        memory_run(&l, &one, n / 10)?; // warm-up
        let d = memory_run(&l, &one, n)?;
        rows.push(Row {
            metric: "limiter check in process, 1 thread, 1 caller (mean)".into(),
            value: ns_per(d, n),
            target: "<= 1 us",
        });
        memory_run(&l, &many, many.len())?; // every caller's bucket exists
        let d = memory_run(&l, &many, n)?;
        rows.push(Row {
            metric: "limiter check in process, 1 thread, 10000 callers (mean)".into(),
            value: ns_per(d, n),
            target: "<= 1 us",
        });
        // Per-check distribution, each check timed on its own (the clock read is included).
        let mut each = Vec::with_capacity(n.min(200_000));
        for i in 0..each.capacity() {
            let p = &many[i % many.len()];
            let t = Instant::now();
            let a = futures::executor::block_on(l.check(p, RouteClass::Standard));
            each.push(t.elapsed());
            if !matches!(a, Admission::Admitted(_)) {
                bail!("check not admitted: {a:?}");
            }
        }
        each.sort_unstable();
        let pick = |p| {
            percentile(&each, p).map_or_else(|| "n/a".into(), |d| format!("{} ns", d.as_nanos()))
        };
        rows.push(Row {
            metric: "  per check p50 / p99 (each timed)".into(),
            value: format!("{} / {}", pick(50.0), pick(99.0)),
            target: "",
        });
        let l = Arc::new(l);
        let many = Arc::new(many);
        let start = Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let (l, many) = (l.clone(), many.clone());
                std::thread::spawn(move || {
                    let mine: Vec<Principal> = many.iter().skip(t).step_by(2).cloned().collect();
                    memory_run(&l, &mine, n)
                })
            })
            .collect();
        for t in threads {
            match t.join() {
                Ok(r) => {
                    r?;
                }
                Err(_) => bail!("a check thread panicked"),
            }
        }
        let d = start.elapsed();
        rows.push(Row {
            metric: "limiter checks in process, 2 threads at once (wall time per check)".into(),
            value: ns_per(d, 2 * n),
            target: "",
        });
        Ok(rows)
    })
    .await??;
    rows.extend(memory);

    let redis = RedisServer::start().map_err(anyhow::Error::msg)?;
    let l = Arc::new(Limiter::redis(&redis.url(), generous()).await?);
    let rn = args.redis_checks.max(2);
    eprintln!("redis {}: {rn} checks, 1 then 16 at a time", redis.url());
    let callers: Arc<Vec<Principal>> = Arc::new((0..1000).map(caller).collect());
    redis_run(&l, &callers, 1, rn / 10).await?; // warm-up (script loaded, connection open)
    for conc in [1usize, 16] {
        let lat = redis_run(&l, &callers, conc, rn).await?;
        let pick = |p| percentile(&lat, p).map_or_else(|| "n/a".into(), us);
        rows.push(Row {
            metric: format!("limiter check on Redis (one script call) p50 / p99 @ c={conc}"),
            value: format!("{} / {}", pick(50.0), pick(99.0)),
            target: if conc == 1 { "p50 <= 150 us" } else { "" },
        });
    }
    drop(l);

    rows.extend(gateway(args, &redis).await?);
    Ok(rows)
}

/// `n` checks on Redis by `conc` closed-loop tasks; the sorted latencies.
async fn redis_run(
    l: &Arc<Limiter>,
    callers: &Arc<Vec<Principal>>,
    conc: usize,
    n: usize,
) -> Result<Vec<Duration>> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (l, callers, next) = (l.clone(), callers.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(out);
                }
                let t = Instant::now();
                match l
                    .check(&callers[i % callers.len()], RouteClass::Standard)
                    .await
                {
                    Admission::Admitted(_) => out.push(t.elapsed()),
                    other => bail!("check {i} not admitted: {other:?}"),
                }
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_unstable();
    Ok(all)
}

/// The gateway's latency at c=16 with limits off, on in memory, and on in Redis.
async fn gateway(args: &LimitsArgs, redis: &RedisServer) -> Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let (fake, fake_url) = start_fake(dir.path(), args.instrument_threads).await?;
    let provider = format!(
        "[[llm.providers]]\nname = \"fake\"\nbase_url = \"{fake_url}/v1\"\nmodels = [\"fake-model\"]\npool_max_idle = 1024\n"
    );
    let on = format!(
        "[rate_limits]\napply_to_admin = true\nllm_requests_per_minute = {m}\nllm_tokens_per_minute = {m}\n\n{provider}",
        m = RateLimits::MAX_PER_MINUTE
    );
    let write = |name: &str, body: &str| -> Result<String> {
        let p = dir.path().join(name);
        std::fs::write(&p, body)?;
        Ok(p.display().to_string())
    };
    let off_cfg = write(
        "off.toml",
        &format!("[rate_limits]\nenabled = false\n\n{provider}"),
    )?;
    let on_cfg = write("on.toml", &on)?;
    let start = |cfg: String, extra: Vec<String>| {
        let mut extra_args = vec!["--config".to_owned(), cfg];
        extra_args.extend(extra);
        Hub::start(HubOptions {
            extra_args,
            ..HubOptions::default()
        })
    };
    let shared_args = || {
        vec![
            "--store".to_owned(),
            redis.url(),
            "--hub-mode".to_owned(),
            "shared".to_owned(),
        ]
    };
    let off = start(off_cfg.clone(), Vec::new()).await?;
    let mem = start(on_cfg.clone(), Vec::new()).await?;
    let shared_off = start(off_cfg, shared_args()).await?;
    let shared = start(on_cfg, shared_args()).await?;
    eprintln!("gateway: fake {fake_url} (pid {})", fake.pid());
    for (what, h) in [
        ("alone, limits off", &off),
        ("alone, limits on in memory", &mem),
        ("shared, limits off", &shared_off),
        ("shared, limits on in Redis", &shared),
    ] {
        eprintln!("gateway: hub {what}: {} (pid {})", h.url(), h.pid());
    }
    let target = |h: &Hub| Target {
        chat_url: format!("{}/v1/chat/completions", h.url()),
        auth: Some(format!("Bearer {}", h.api_key())),
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()?;
    let (t_off, t_mem) = (target(&off), target(&mem));
    let (t_shared_off, t_shared) = (target(&shared_off), target(&shared));
    eprintln!("gateway: warming up");
    for t in [&t_off, &t_mem, &t_shared_off, &t_shared] {
        closed_loop(&client, t, false, 16, 2000).await?;
    }
    let mut rows = Vec::new();
    let n = args.samples.max(2);
    for (name, (h_off, t_off), (h_on, t_on)) in [
        (
            "alone: limits off / on in memory",
            (&off, &t_off),
            (&mem, &t_mem),
        ),
        (
            "shared: limits off / on in Redis",
            (&shared_off, &t_shared_off),
            (&shared, &t_shared),
        ),
    ] {
        for conc in [1usize, 16] {
            eprintln!("gateway, {name}, c={conc}: {n} requests each");
            let half = n / 2;
            // Each path's hub CPU over its own runs: what the limits cost per request.
            let (mut cpu_off, mut cpu_on) = (0u64, 0u64);
            let mut a = Vec::with_capacity(n);
            let mut b = Vec::with_capacity(n);
            for part in [half, n - half] {
                let c0 = cpu_ticks(h_off.pid())?;
                a.extend(closed_loop(&client, t_off, false, conc, part).await?);
                cpu_off += cpu_ticks(h_off.pid())? - c0;
                let c0 = cpu_ticks(h_on.pid())?;
                b.extend(closed_loop(&client, t_on, false, conc, part).await?);
                cpu_on += cpu_ticks(h_on.pid())? - c0;
            }
            a.sort_unstable();
            b.sort_unstable();
            for p in [50.0, 99.0] {
                let (Some(ap), Some(bp)) = (percentile(&a, p), percentile(&b, p)) else {
                    bail!("no samples");
                };
                let added = bp.as_secs_f64() - ap.as_secs_f64();
                rows.push(Row {
                    metric: format!("gateway non-stream p{p:.0} @ c={conc}, {name}"),
                    value: format!("{} / {} (added {:+.3} ms)", ms(ap), ms(bp), added * 1000.0),
                    target: if p == 50.0 && conc == 16 {
                        "added <= 0.3 ms"
                    } else {
                        ""
                    },
                });
            }
            if conc == 16 {
                // Clock ticks are 10 ms: per request in µs.
                let per = |t: u64| t as f64 * 10_000.0 / n as f64;
                rows.push(Row {
                    metric: format!("  hub CPU per request @ c=16, {name}"),
                    value: format!("{:.1} us / {:.1} us", per(cpu_off), per(cpu_on)),
                    target: "",
                });
            }
        }
    }
    drop((off, mem, shared_off, shared));
    drop(fake);
    Ok(rows)
}

//! Machine figures for `GET /api/v1/system/status`, sampled in the background so a request never
//! waits on `/proc`: CPU and memory use of the hub's machine (sysinfo), GPU use when
//! `nvidia-smi` is installed, and the dispatch rate (assignments per second over the last
//! minute, from `apex_tasks_dispatched_total`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::metrics;

/// How often the sampler runs.
const PERIOD: Duration = Duration::from_secs(2);

/// Window of the dispatch rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The latest figures.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Whole-machine CPU use, percent (0–100). `None` before the first sample.
    pub cpu_usage: Option<f64>,
    /// Used memory / total memory, percent.
    pub memory_usage: Option<f64>,
    /// Used memory, bytes.
    pub memory_used_bytes: Option<u64>,
    /// Total memory, bytes.
    pub memory_total_bytes: Option<u64>,
    /// GPU utilization, percent (mean over GPUs); `None` without a GPU or `nvidia-smi`.
    pub gpu_usage: Option<f64>,
}

/// Background sampler; share it in an `Arc`.
#[derive(Default)]
pub struct SystemSampler {
    last: Mutex<Sample>,
    /// (time, dispatched total) pairs within the rate window.
    dispatched: Mutex<VecDeque<(Instant, u64)>>,
}

impl SystemSampler {
    /// An empty sampler.
    pub fn new() -> Self {
        Self::default()
    }

    /// The latest machine figures.
    pub fn sample(&self) -> Sample {
        self.last.lock().clone()
    }

    /// Task assignments per second over the last minute (or since start).
    pub fn dispatch_rate(&self) -> f64 {
        let now_total = metrics::get().tasks_dispatched.get();
        let q = self.dispatched.lock();
        match q.front() {
            Some((t, n)) => {
                let secs = t.elapsed().as_secs_f64();
                if secs <= 0.0 {
                    0.0
                } else {
                    now_total.saturating_sub(*n) as f64 / secs
                }
            }
            None => 0.0,
        }
    }

    fn record_dispatch(&self) {
        let now = Instant::now();
        let mut q = self.dispatched.lock();
        q.push_back((now, metrics::get().tasks_dispatched.get()));
        while q
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            q.pop_front();
        }
    }

    /// Samples every 2 s until `stop` flips.
    pub async fn run(self: std::sync::Arc<Self>, mut stop: watch::Receiver<bool>) {
        self.record_dispatch();
        let mut sys = match sysinfo::System::new() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read machine statistics; cpu/memory will be null");
                None
            }
        };
        let has_nvidia = which("nvidia-smi");
        loop {
            if let Some(sys) = &mut sys {
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                let total = sys.total_memory();
                let used = sys.used_memory();
                let mut s = self.last.lock();
                s.cpu_usage = Some(f64::from(sys.global_cpu_usage()));
                s.memory_total_bytes = Some(total);
                s.memory_used_bytes = Some(used);
                s.memory_usage = (total > 0).then(|| used as f64 * 100.0 / total as f64);
            }
            if has_nvidia {
                let gpu = tokio::task::spawn_blocking(nvidia_utilization)
                    .await
                    .ok()
                    .flatten();
                self.last.lock().gpu_usage = gpu;
            }
            self.record_dispatch();
            tokio::select! {
                _ = tokio::time::sleep(PERIOD) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Mean `utilization.gpu` of every GPU `nvidia-smi` lists.
fn nvidia_utilization() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let vals: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
}

//! Load figures the node reports in `node_register` and `heartbeat`: task counters kept by the
//! executor, and the machine's CPU and memory use sampled with sysinfo.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use apex_protocol::NodeStats;

/// Task counters, shared by the executor (writer) and the connection (reader).
#[derive(Debug, Default)]
pub struct TaskCounters {
    total: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    timed: AtomicU64,
    total_exec_ms: AtomicU64,
    last_task_at: AtomicI64,
}

impl TaskCounters {
    /// A task was received.
    pub fn received(&self) {
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// A task ended; `exec_ms` is how long its tool ran, if it ran at all.
    pub fn finished(&self, success: bool, exec_ms: Option<u64>) {
        if success {
            self.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ms) = exec_ms {
            self.timed.fetch_add(1, Ordering::Relaxed);
            self.total_exec_ms.fetch_add(ms, Ordering::Relaxed);
        }
        self.last_task_at
            .store(apex_protocol::now_ms(), Ordering::Relaxed);
    }

    /// The counters as wire stats, with `active` running tasks and the machine `load`.
    pub fn snapshot(&self, active: usize, load: MachineLoad) -> NodeStats {
        let timed = self.timed.load(Ordering::Relaxed);
        let exec = self.total_exec_ms.load(Ordering::Relaxed);
        let last = self.last_task_at.load(Ordering::Relaxed);
        NodeStats {
            active_tasks: active as u64,
            total_tasks: self.total.load(Ordering::Relaxed),
            completed_tasks: self.completed.load(Ordering::Relaxed),
            failed_tasks: self.failed.load(Ordering::Relaxed),
            average_response_time: Some(if timed == 0 {
                0.0
            } else {
                exec as f64 / timed as f64
            }),
            last_task_at: (last > 0).then(|| last.into()),
            cpu_usage: load.cpu_percent,
            memory_usage: load.memory_percent,
        }
    }
}

/// CPU and memory use of the machine, percent (0-100); `None` when unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineLoad {
    /// CPU use since the previous sample.
    pub cpu_percent: Option<f64>,
    /// Memory in use.
    pub memory_percent: Option<f64>,
}

/// Samples CPU and memory use. CPU use is measured between two samples, so the first one
/// reports the use since boot as sysinfo sees it (usually 0).
pub struct LoadSampler {
    system: Option<sysinfo::System>,
}

impl Default for LoadSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadSampler {
    /// A sampler; if sysinfo cannot read the machine, every sample is unknown.
    pub fn new() -> Self {
        let system = match sysinfo::System::new() {
            Ok(mut s) => {
                s.refresh_cpu_usage();
                Some(s)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read system load; cpu and memory use will not be reported");
                None
            }
        };
        Self { system }
    }

    /// Takes a sample (cheap: reads `/proc/stat` and `/proc/meminfo` on Linux).
    pub fn sample(&mut self) -> MachineLoad {
        let Some(s) = self.system.as_mut() else {
            return MachineLoad::default();
        };
        s.refresh_cpu_usage();
        s.refresh_memory();
        let cpu = f64::from(s.global_cpu_usage());
        let total = s.total_memory();
        let memory = (total > 0).then(|| s.used_memory() as f64 * 100.0 / total as f64);
        MachineLoad {
            cpu_percent: cpu.is_finite().then(|| round2(cpu.clamp(0.0, 100.0))),
            memory_percent: memory.map(|m| round2(m.clamp(0.0, 100.0))),
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_average() {
        let c = TaskCounters::default();
        c.received();
        c.received();
        c.received();
        c.finished(true, Some(10));
        c.finished(false, Some(30));
        c.finished(false, None);
        let s = c.snapshot(1, MachineLoad::default());
        assert_eq!(s.total_tasks, 3);
        assert_eq!(s.completed_tasks, 1);
        assert_eq!(s.failed_tasks, 2);
        assert_eq!(s.active_tasks, 1);
        assert_eq!(s.average_response_time, Some(20.0));
        assert!(s.last_task_at.is_some());
    }

    #[test]
    fn machine_load_is_a_percentage() {
        let mut sampler = LoadSampler::new();
        let load = sampler.sample();
        for v in [load.cpu_percent, load.memory_percent]
            .into_iter()
            .flatten()
        {
            assert!((0.0..=100.0).contains(&v), "{v}");
        }
    }
}

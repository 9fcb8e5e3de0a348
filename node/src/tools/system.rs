//! `system_info`: facts about the node's machine (host, OS, CPUs, memory, load).

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Error, Tool, ToolContext, ToolFuture, parse_args, schema_of};

/// Arguments of `system_info`: none.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SystemInfoArgs {}

/// `system_info`: returns `{hostname, os, os_version, kernel_version, arch, cpus,
/// memory_total_bytes, memory_used_bytes, memory_available_bytes, load_average, uptime_seconds}`.
pub struct SystemInfo;

impl Tool for SystemInfo {
    fn name(&self) -> &'static str {
        "system_info"
    }
    fn description(&self) -> &'static str {
        "Reports the node machine's hostname, OS, CPU count, memory and load average"
    }
    fn parameters(&self) -> Value {
        schema_of::<SystemInfoArgs>()
    }
    fn call(&self, args: Value, _ctx: ToolContext) -> ToolFuture {
        Box::pin(async move {
            let _: SystemInfoArgs = parse_args(args)?;
            tokio::task::spawn_blocking(collect)
                .await
                .map_err(|e| Error::Failed(format!("system_info failed: {e}")))?
        })
    }
}

fn collect() -> Result<Value, Error> {
    use sysinfo::System;
    let mut sys =
        System::new().map_err(|e| Error::Failed(format!("cannot read system information: {e}")))?;
    sys.refresh_memory();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let load = System::load_average().ok();
    Ok(json!({
        "hostname": System::host_name().ok(),
        "os": System::name().ok(),
        "os_version": System::long_os_version().ok(),
        "kernel_version": System::kernel_version().ok(),
        "arch": System::cpu_arch(),
        "cpus": cpus,
        "memory_total_bytes": sys.total_memory(),
        "memory_used_bytes": sys.used_memory(),
        "memory_available_bytes": sys.available_memory(),
        "load_average": load.map(|l| json!({"one": l.one, "five": l.five, "fifteen": l.fifteen})),
        "uptime_seconds": System::uptime().ok(),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_real_figures() {
        let out = SystemInfo
            .call(Value::Null, ToolContext::detached())
            .await
            .unwrap();
        assert!(out["cpus"].as_u64().unwrap() >= 1);
        assert!(out["memory_total_bytes"].as_u64().unwrap() > 0);
        assert!(out["hostname"].is_string() || out["hostname"].is_null());
        let err = SystemInfo
            .call(json!({"verbose": true}), ToolContext::detached())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_arguments");
    }
}

//! Helpers for tests of shared mode (several hubs on one real `redis-server`).

use serde_json::Value;

use crate::process::HubOptions;
use crate::redis::RedisServer;

/// Options of a shared-mode hub on `redis` (`--store <url> --hub-mode shared`, no data
/// directory), with the keys and other settings of `base` when given.
pub fn shared_hub(redis: &RedisServer, base: Option<&HubOptions>) -> HubOptions {
    let base = base.cloned().unwrap_or_default();
    HubOptions {
        extra_args: vec![
            "--store".into(),
            redis.url(),
            "--hub-mode".into(),
            "shared".into(),
        ],
        data_dir: None,
        ..base
    }
}

/// The stored record of task `id` in the shared store (`HGET apex:shared:task:<id> record`,
/// read with `redis-cli`); `None` if there is none.
///
/// # Panics
/// If `redis-cli` cannot run or the record is not JSON (a test failure).
#[allow(clippy::unwrap_used)]
pub fn stored_record(redis: &RedisServer, id: &str) -> Option<Value> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "--raw", "HGET"])
        .arg(format!("apex:shared:task:{id}"))
        .arg("record")
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    (!text.is_empty()).then(|| serde_json::from_str(text).unwrap())
}

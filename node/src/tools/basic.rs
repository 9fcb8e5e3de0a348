//! The simple tools: `echo`, `noop` and `sleep`.

use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Error, Tool, ToolContext, ToolFuture, parse_args, schema_of};

/// Longest `sleep`, in milliseconds (one hour).
pub const MAX_SLEEP_MS: u64 = 3_600_000;

/// `echo`: returns its arguments as `{echoed: args}`.
pub struct Echo;

impl Tool for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn description(&self) -> &'static str {
        "Returns its arguments unchanged as {echoed: args}"
    }
    fn parameters(&self) -> Value {
        // Any JSON value is accepted.
        schema_of::<Value>()
    }
    fn call(&self, args: Value, _ctx: ToolContext) -> ToolFuture {
        Box::pin(async move { Ok(json!({ "echoed": args })) })
    }
}

/// `noop`: returns `null` at once, whatever its arguments (benchmarks use it to measure the
/// dispatch path alone).
pub struct Noop;

impl Tool for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }
    fn description(&self) -> &'static str {
        "Does nothing and returns null immediately; arguments are ignored"
    }
    fn parameters(&self) -> Value {
        schema_of::<Value>()
    }
    fn call(&self, _args: Value, _ctx: ToolContext) -> ToolFuture {
        Box::pin(async { Ok(Value::Null) })
    }
}

/// Arguments of `sleep`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SleepArgs {
    /// How long to sleep, in milliseconds (at most one hour).
    #[schemars(range(max = 3_600_000))]
    pub ms: u64,
}

/// `sleep`: waits `ms` milliseconds, reporting progress every second on long sleeps, and
/// returns `{slept_ms}`.
pub struct Sleep;

impl Tool for Sleep {
    fn name(&self) -> &'static str {
        "sleep"
    }
    fn description(&self) -> &'static str {
        "Waits the given number of milliseconds (at most one hour) and returns {slept_ms}"
    }
    fn parameters(&self) -> Value {
        schema_of::<SleepArgs>()
    }
    fn call(&self, args: Value, ctx: ToolContext) -> ToolFuture {
        Box::pin(async move {
            let args: SleepArgs = parse_args(args)?;
            if args.ms > MAX_SLEEP_MS {
                return Err(Error::InvalidArguments(format!(
                    "`ms` must be at most {MAX_SLEEP_MS}, got {}",
                    args.ms
                )));
            }
            let start = tokio::time::Instant::now();
            let end = start + Duration::from_millis(args.ms);
            if args.ms >= 2_000 {
                let mut tick = tokio::time::interval_at(
                    start + Duration::from_secs(1),
                    Duration::from_secs(1),
                );
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(end) => break,
                        t = tick.tick() => {
                            let done = t.duration_since(start).as_millis() as f64;
                            ctx.progress.report(done * 100.0 / args.ms as f64, None);
                        }
                    }
                }
            } else {
                tokio::time::sleep_until(end).await;
            }
            Ok(json!({ "slept_ms": args.ms }))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echo_returns_its_arguments() {
        let out = Echo
            .call(json!({"a": [1, 2]}), ToolContext::detached())
            .await
            .unwrap();
        assert_eq!(out, json!({"echoed": {"a": [1, 2]}}));
    }

    #[tokio::test]
    async fn noop_returns_null() {
        let out = Noop.call(json!({"x": 1}), ToolContext::detached()).await;
        assert_eq!(out, Ok(Value::Null));
    }

    #[tokio::test]
    async fn sleep_sleeps() {
        let out = Sleep.call(json!({"ms": 20}), ToolContext::detached()).await;
        assert_eq!(out, Ok(json!({"slept_ms": 20})));
    }

    #[tokio::test]
    async fn sleep_rejects_bad_arguments() {
        for (args, needle) in [
            (json!({}), "missing field `ms`"),
            (json!({"ms": "soon"}), "invalid type"),
            (json!({"ms": 5, "extra": 1}), "unknown field `extra`"),
            (json!({"ms": -1}), "invalid value"),
            (json!({"ms": MAX_SLEEP_MS + 1}), "at most"),
            (json!([1]), "must be a JSON object"),
        ] {
            let err = Sleep
                .call(args.clone(), ToolContext::detached())
                .await
                .unwrap_err();
            assert_eq!(err.code(), "invalid_arguments", "{args}");
            assert!(err.to_string().contains(needle), "{args}: {err}");
        }
    }
}

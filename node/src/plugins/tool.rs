//! [`PluginTool`]: a loaded plugin as a node [`Tool`]: each call runs the plugin's entry
//! command once ([`super::process`]), with retries, and reads its answer from stdout.
//!
//! **The stdio contract.** The task's arguments are written to stdin as one JSON document, then
//! stdin is closed. The plugin prints one JSON object on stdout:
//! `{"status": "success", "result": …, "messageForAI"?: …}` or
//! `{"status": "error", "error": …}`, and exits 0.
//! - `success`: the task's result is `result` (`null` if absent); when `messageForAI` is
//!   present the result is `{"result": <result>, "messageForAI": <messageForAI>}` instead.
//! - `error`: the task fails (`task_execution_failed`) with `error` as its message (a string as
//!   it is, anything else as JSON text; `messageForAI` stands in when `error` is absent).
//! - stdout that is not JSON is the result as a string (trailing newlines removed); JSON that
//!   is not an object with a `status` of `success` or `error` is the result as it is.
//! - a non-zero exit fails the task with the exit code and the last 2 KiB of stderr, whatever
//!   stdout says; more than 1 MiB on stdout fails it too.
//! - past the manifest's timeout the process group is killed and the task ends `task_timeout`.
//!
//! **Environment.** Cleared, then: `PATH`, `HOME`, `LANG`, … as the `shell` tool passes them
//! ([`crate::tools::shell::PASSED_ENV`]), the plugin's config values (manifest `config`, then
//! `config.env`), then `APEX_TASK_ID`, `APEX_PLUGIN_NAME` and, when the hub sent a callback,
//! `APEX_CALLBACK_URL` and `APEX_CALLBACK_SECRET` (these four cannot be overridden by config).
//!
//! **Asynchronous plugins.** One that answers `{"status": "success", "result": {"taskId": …,
//! "status": "pending"}}` has handed the work to a process of its own, which will `POST` the
//! result to `APEX_CALLBACK_URL`; the hub ends the task when that callback arrives. The tool
//! reports progress ("waiting for the plugin's callback") and then waits until its future is
//! dropped (the hub's `task_cancel` once the callback came, or the task's timeout). Without a
//! callback in `task_assign.metadata` a pending answer fails the task.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use apex_protocol::{PluginInfo, PluginType};
use serde_json::{Value, json};

use super::manifest::Manifest;
use super::process::{self, Output};
use crate::tools::shell::{CHILD_PATH, PASSED_ENV};
use crate::tools::{Error, Tool, ToolContext, ToolFuture};

/// Progress message of an asynchronous plugin's task once the plugin answered `pending`.
pub const WAITING_MESSAGE: &str = "waiting for the plugin's callback";

/// A plugin loaded from its directory, offered as a tool under its manifest's name.
pub struct PluginTool {
    inner: Arc<Inner>,
}

struct Inner {
    manifest: Manifest,
    /// The plugin's directory: the process's working directory.
    dir: PathBuf,
    /// The program to start: the manifest's, with a relative path (`./run.sh`) made absolute
    /// against `dir`.
    program: PathBuf,
}

impl PluginTool {
    /// The tool of `manifest`, found in `dir` (which must be absolute).
    pub fn new(manifest: Manifest, dir: PathBuf) -> Self {
        let first = manifest.command.first().map_or("", String::as_str);
        let program = program_path(first, &dir);
        Self {
            inner: Arc::new(Inner {
                manifest,
                dir,
                program,
            }),
        }
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// The plugin's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The program each call starts.
    pub fn program(&self) -> &Path {
        &self.inner.program
    }
}

/// `program` as started from `dir`: a relative path with a `/` is joined to `dir`; a bare name
/// stays a name (looked up in `PATH`); an absolute path stays.
pub fn program_path(program: &str, dir: &Path) -> PathBuf {
    let p = Path::new(program);
    if program.contains('/') && p.is_relative() {
        dir.join(p)
    } else {
        p.to_path_buf()
    }
}

impl Tool for PluginTool {
    fn name(&self) -> &str {
        &self.inner.manifest.name
    }
    fn description(&self) -> &str {
        &self.inner.manifest.description
    }
    fn parameters(&self) -> Value {
        self.inner.manifest.parameters.clone()
    }
    fn examples(&self) -> Vec<Value> {
        self.inner.manifest.examples.clone()
    }
    fn plugin(&self) -> Option<PluginInfo> {
        Some(self.inner.manifest.info.clone())
    }
    fn call(&self, args: Value, ctx: ToolContext) -> ToolFuture {
        let inner = self.inner.clone();
        Box::pin(async move { inner.call(args, ctx).await })
    }
}

impl Inner {
    async fn call(&self, args: Value, ctx: ToolContext) -> Result<Value, Error> {
        let started = tokio::time::Instant::now();
        // `null` (no arguments) is sent as `{}`, as the built-in tools read it.
        let args = if args.is_null() { json!({}) } else { args };
        let input = serde_json::to_vec(&args)
            .map_err(|e| Error::InvalidArguments(format!("cannot encode the arguments: {e}")))?;
        let retry = self.manifest.retry;
        let mut attempt = 1;
        let value = loop {
            match self.run_once(&input, &ctx).await {
                Ok(v) => break v,
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Reported(e)) if attempt >= retry.max_attempts => return Err(e),
                Err(Failure::Reported(e)) => {
                    tracing::debug!(plugin = %self.manifest.name, task_id = %ctx.task_id, attempt, error = %e, "plugin failed; running it again");
                    attempt += 1;
                    tokio::time::sleep(retry.backoff).await;
                }
            }
        };
        if self.manifest.info.plugin_type == PluginType::Asynchronous && is_pending(&value) {
            if ctx.callback.is_none() {
                return Err(Error::Failed(format!(
                    "asynchronous plugin `{}` answered pending, but the hub sent no callback \
                     URL for this task (task_assign.metadata.callback), so its result could \
                     never arrive",
                    self.manifest.name
                )));
            }
            // After the executor's own "started" report, so this message is the one shown.
            tokio::time::sleep_until(started + crate::executor::STARTED_AFTER).await;
            ctx.progress.report(0.0, Some(WAITING_MESSAGE.to_owned()));
            // The hub ends the task when the callback arrives (and cancels this future).
            std::future::pending::<()>().await;
        }
        Ok(value)
    }

    async fn run_once(&self, input: &[u8], ctx: &ToolContext) -> Result<Value, Failure> {
        let spec = process::Spec {
            program: self.program.clone(),
            args: self.manifest.command.iter().skip(1).cloned().collect(),
            cwd: self.dir.clone(),
            env: self.env(ctx),
            stdin: input.to_vec(),
            timeout: self.manifest.timeout,
        };
        let name = &self.manifest.name;
        match process::run(spec).await {
            Ok(out) => interpret(name, &out),
            Err(process::Error::Timeout(d)) => Err(Failure::Final(Error::Timeout(format!(
                "plugin `{name}` ran past its timeout of {} ms and was killed",
                d.as_millis()
            )))),
            Err(e) => Err(Failure::Final(Error::Failed(format!(
                "plugin `{name}`: {e}"
            )))),
        }
    }

    /// The process's whole environment (see the module doc).
    fn env(&self, ctx: &ToolContext) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = Vec::new();
        let mut set = |k: &str, v: OsString| {
            env.retain(|(name, _)| name != k);
            env.push((k.into(), v));
        };
        for k in PASSED_ENV {
            if let Some(v) = std::env::var_os(k) {
                set(k, v);
            }
        }
        if std::env::var_os("PATH").is_none() {
            set("PATH", CHILD_PATH.into());
        }
        for (k, v) in self.manifest.config.iter() {
            set(k, v.into());
        }
        set("APEX_TASK_ID", ctx.task_id.clone().into());
        set("APEX_PLUGIN_NAME", self.manifest.name.clone().into());
        if let Some(cb) = &ctx.callback {
            set("APEX_CALLBACK_URL", cb.url.clone().into());
            set("APEX_CALLBACK_SECRET", cb.secret.clone().into());
        }
        env
    }
}

/// Why one run failed.
enum Failure {
    /// The plugin reported failure (`status: "error"`, non-zero exit): retried.
    Reported(Error),
    /// Timeout, or it could not run: not retried.
    Final(Error),
}

/// Reads a finished run's answer (see the module doc for the rules).
fn interpret(name: &str, out: &Output) -> Result<Value, Failure> {
    if !out.status.success() {
        let how = match out.status.code() {
            Some(code) => format!("exited with code {code}"),
            None => {
                use std::os::unix::process::ExitStatusExt;
                format!(
                    "was killed by signal {}",
                    out.status.signal().unwrap_or_default()
                )
            }
        };
        let stderr = String::from_utf8_lossy(&out.stderr_tail);
        let stderr = stderr.trim();
        let msg = if stderr.is_empty() {
            format!("plugin `{name}` {how}")
        } else {
            format!("plugin `{name}` {how}: {stderr}")
        };
        return Err(Failure::Reported(Error::Failed(msg)));
    }
    if out.stdout_truncated {
        return Err(Failure::Final(Error::Failed(format!(
            "plugin `{name}` wrote more than {} bytes to stdout",
            process::MAX_STDOUT_BYTES
        ))));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let Ok(value) = serde_json::from_str::<Value>(text.trim()) else {
        return Ok(Value::String(
            text.trim_end_matches(['\n', '\r']).to_owned(),
        ));
    };
    let Value::Object(mut obj) = value else {
        return Ok(value);
    };
    match obj.get("status").and_then(Value::as_str) {
        Some("success") => {
            let result = obj.remove("result").unwrap_or(Value::Null);
            Ok(match obj.remove("messageForAI") {
                Some(m) => json!({"result": result, "messageForAI": m}),
                None => result,
            })
        }
        Some("error") => {
            let message = match obj.get("error").or_else(|| obj.get("messageForAI")) {
                Some(Value::String(s)) => s.clone(),
                Some(v) if !v.is_null() => v.to_string(),
                _ => "the plugin reported an error".to_owned(),
            };
            Err(Failure::Reported(Error::Failed(format!(
                "plugin `{name}`: {message}"
            ))))
        }
        _ => Ok(Value::Object(obj)),
    }
}

/// `{"taskId": …, "status": "pending"}` (possibly wrapped with a `messageForAI`): an
/// asynchronous plugin's "result to follow".
fn is_pending(v: &Value) -> bool {
    let pending = |v: &Value| v.get("status").and_then(Value::as_str) == Some("pending");
    pending(v) || (v.get("messageForAI").is_some() && v.get("result").is_some_and(pending))
}

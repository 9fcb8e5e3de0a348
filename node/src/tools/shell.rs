//! `shell`: runs an allow-listed program directly (no shell interpretation) and captures its
//! output. The child is killed when the task is cancelled or times out.

use std::process::Stdio;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{Error, Tool, ToolContext, ToolFuture, encode_bytes, parse_args, schema_of};
use crate::config::ENV_PREFIX;

/// Most bytes kept of each of stdout and stderr (1 MiB); the rest is read and discarded.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// Arguments of `shell`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShellArgs {
    /// Program to run; must be on the node's allow-list. It is run directly, not by a shell.
    pub command: String,
    /// Arguments, passed to the program as they are.
    #[serde(default)]
    pub args: Vec<String>,
    /// Text written to the program's standard input (default: none).
    #[serde(default)]
    pub stdin: Option<String>,
}

/// `shell`: returns `{exit_code, signal, success, stdout, stderr, stdout_truncated,
/// stderr_truncated}`. A program that exits non-zero is still a successful task: the caller
/// reads `exit_code`.
pub struct Shell {
    allowed: Vec<String>,
}

impl Shell {
    /// A runner for the programs in `allowed` (exact match of `command`).
    pub fn new(allowed: Vec<String>) -> Self {
        Self { allowed }
    }
}

impl Tool for Shell {
    fn name(&self) -> &'static str {
        "shell"
    }
    fn description(&self) -> &'static str {
        "Runs an allow-listed program with arguments (no shell) and returns its exit code, stdout and stderr"
    }
    fn parameters(&self) -> Value {
        schema_of::<ShellArgs>()
    }
    fn call(&self, args: Value, _ctx: ToolContext) -> ToolFuture {
        let allowed = self.allowed.clone();
        Box::pin(async move {
            let args: ShellArgs = parse_args(args)?;
            if args.command.is_empty() {
                return Err(Error::InvalidArguments(
                    "`command` must not be empty".into(),
                ));
            }
            if !allowed.contains(&args.command) {
                return Err(Error::AccessDenied(format!(
                    "program `{}` is not on the node's allow-list",
                    args.command
                )));
            }
            run(args).await
        })
    }
}

async fn run(args: ShellArgs) -> Result<Value, Error> {
    let mut cmd = tokio::process::Command::new(&args.command);
    cmd.args(&args.args)
        .stdin(if args.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // The node's own settings (its key among them) are not the program's business.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with(ENV_PREFIX) {
            cmd.env_remove(k);
        }
    }
    // Nor is systemd's notification socket: a program must not report for the node.
    for k in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Failed(format!("cannot start `{}`: {e}", args.command)))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let feed = async move {
        if let (Some(mut pipe), Some(text)) = (stdin, args.stdin) {
            // A program that exits without reading its input is not an error.
            let _ = pipe.write_all(text.as_bytes()).await;
        }
    };
    let ((), out, err) = tokio::join!(feed, read_capped(stdout), read_capped(stderr));
    let (out, out_truncated) = out.map_err(|e| Error::Failed(format!("reading stdout: {e}")))?;
    let (err, err_truncated) = err.map_err(|e| Error::Failed(format!("reading stderr: {e}")))?;
    let status = child
        .wait()
        .await
        .map_err(|e| Error::Failed(format!("waiting for `{}`: {e}", args.command)))?;
    let signal = {
        use std::os::unix::process::ExitStatusExt;
        status.signal()
    };
    let (stdout, stdout_encoding) = encode_bytes(&out);
    let (stderr, stderr_encoding) = encode_bytes(&err);
    Ok(json!({
        "exit_code": status.code(),
        "signal": signal,
        "success": status.success(),
        "stdout": stdout,
        "stdout_encoding": stdout_encoding,
        "stdout_truncated": out_truncated,
        "stderr": stderr,
        "stderr_encoding": stderr_encoding,
        "stderr_truncated": err_truncated,
    }))
}

/// Reads to the end, keeping the first [`MAX_OUTPUT_BYTES`] (reading on so the child never
/// blocks on a full pipe).
async fn read_capped<R: AsyncRead + Unpin>(pipe: Option<R>) -> std::io::Result<(Vec<u8>, bool)> {
    let Some(mut pipe) = pipe else {
        return Ok((Vec::new(), false));
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = pipe.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        let room = MAX_OUTPUT_BYTES - kept.len();
        if n > room {
            kept.extend_from_slice(&chunk[..room]);
            truncated = true;
        } else {
            kept.extend_from_slice(&chunk[..n]);
        }
    }
    Ok((kept, truncated))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn shell() -> Shell {
        Shell::new(vec![
            "echo".into(),
            "cat".into(),
            "sh".into(),
            "sleep".into(),
        ])
    }

    #[tokio::test]
    async fn runs_an_allowed_program_without_a_shell() {
        let out = shell()
            .call(
                json!({"command": "echo", "args": ["a b", "$HOME", ";", "ls"]}),
                ToolContext::detached(),
            )
            .await
            .unwrap();
        assert_eq!(out["stdout"], "a b $HOME ; ls\n");
        assert_eq!(out["exit_code"], 0);
        let out = shell()
            .call(
                json!({"command": "cat", "stdin": "piped"}),
                ToolContext::detached(),
            )
            .await
            .unwrap();
        assert_eq!(out["stdout"], "piped");
    }

    #[tokio::test]
    async fn reports_exit_code_and_stderr() {
        let out = shell()
            .call(
                json!({"command": "sh", "args": ["-c", "echo oops >&2; exit 3"]}),
                ToolContext::detached(),
            )
            .await
            .unwrap();
        assert_eq!(out["exit_code"], 3);
        assert_eq!(out["success"], false);
        assert_eq!(out["stderr"], "oops\n");
    }

    #[tokio::test]
    async fn refuses_programs_not_allowed() {
        let err = shell()
            .call(
                json!({"command": "rm", "args": ["-rf", "/"]}),
                ToolContext::detached(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "access_denied");
        let err = shell()
            .call(
                json!({"command": "echo", "args": "not-a-list"}),
                ToolContext::detached(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_arguments");
    }

    #[tokio::test]
    async fn dropping_the_call_kills_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
        let call = shell().call(
            json!({"command": "sh", "args": ["-c", script]}),
            ToolContext::detached(),
        );
        // Run the call until the child has written its pid, then drop it.
        let wait_pid = async {
            loop {
                if let Ok(s) = tokio::fs::read_to_string(&pidfile).await
                    && s.ends_with('\n')
                {
                    return s.trim().parse::<i32>().unwrap();
                }
                tokio::task::yield_now().await;
            }
        };
        let pid = tokio::select! {
            _ = call => panic!("sleep 60 finished"),
            pid = wait_pid => pid,
        };
        // The select dropped the call: the child must be gone (or a zombie being reaped).
        let proc_path = format!("/proc/{pid}/stat");
        let mut gone = false;
        for _ in 0..500 {
            match std::fs::read_to_string(&proc_path) {
                Err(_) => gone = true,
                Ok(stat) => gone = stat.split_whitespace().nth(2) == Some("Z"),
            }
            if gone {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(gone, "child {pid} still running");
    }
}

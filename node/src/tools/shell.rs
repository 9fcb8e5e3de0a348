//! `shell`: runs an allow-listed program directly (no shell interpretation) and captures its
//! output. The child is killed when the task is cancelled or times out.
//!
//! The allow-list is of executables, not of names: each entry (a name looked up in the node's
//! `PATH`, or a path) is resolved once at start to its canonical file, and a task's `command`
//! is resolved the same way and must land on one of those files; the resolved file is what
//! runs (with `argv[0]` as the task gave it), so a `PATH` entry or a symlink added later cannot
//! swap in another program. Arguments go to the program as they are, never through a shell.
//! The program's environment is cleared except for [`PASSED_ENV`] (taken from the node's
//! own environment when set), and `PATH` is [`CHILD_PATH`] when the node has none.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{Error, Tool, ToolContext, ToolFuture, encode_bytes, parse_args, schema_of};

/// The environment variables a program run by `shell` keeps from the node's environment;
/// everything else (the node's key and settings among them) is removed.
pub const PASSED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"];

/// `PATH` of the program when the node has none.
pub const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The canonical executable file `program` names: a path (with a `/`) as it is, a bare name
/// looked up in the directories of `path` (the node's `PATH`); `None` if there is no such
/// executable regular file.
pub fn resolve_program(program: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| -> Option<PathBuf> {
        let c = std::fs::canonicalize(p).ok()?;
        let m = std::fs::metadata(&c).ok()?;
        (m.is_file() && m.permissions().mode() & 0o111 != 0).then_some(c)
    };
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        return executable(Path::new(program));
    }
    let dirs = path.map_or_else(|| std::ffi::OsString::from(CHILD_PATH), ToOwned::to_owned);
    std::env::split_paths(&dirs).find_map(|d| executable(&d.join(program)))
}

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
    /// Canonical executable files.
    allowed: Vec<PathBuf>,
}

impl Shell {
    /// A runner for the programs in `allowed` (names or paths), each resolved now to its
    /// canonical executable ([`resolve_program`]); an entry that resolves to nothing is left
    /// out, with a warning.
    pub fn new(allowed: Vec<String>) -> Self {
        let path = std::env::var_os("PATH");
        let mut files = Vec::with_capacity(allowed.len());
        for name in allowed {
            match resolve_program(&name, path.as_deref()) {
                Some(f) if !files.contains(&f) => files.push(f),
                Some(_) => {}
                None => tracing::warn!(program = %name, "allowed program not found: left out"),
            }
        }
        Self { allowed: files }
    }

    /// The canonical executables this runner may start.
    pub fn allowed(&self) -> &[PathBuf] {
        &self.allowed
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
            let resolved = resolve_program(&args.command, std::env::var_os("PATH").as_deref())
                .filter(|f| allowed.contains(f));
            let Some(program) = resolved else {
                return Err(Error::AccessDenied(format!(
                    "program `{}` is not on the node's allow-list",
                    args.command
                )));
            };
            run(&program, args).await
        })
    }
}

async fn run(program: &Path, args: ShellArgs) -> Result<Value, Error> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg0(&args.command)
        .args(&args.args)
        .env_clear()
        .stdin(if args.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Only the documented variables pass; the node's key and settings never do.
    for k in PASSED_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", CHILD_PATH);
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

    #[tokio::test]
    async fn the_allow_list_is_of_resolved_executables() {
        let s = shell();
        let sh = resolve_program("sh", std::env::var_os("PATH").as_deref()).unwrap();
        assert!(
            s.allowed().contains(&sh),
            "names resolve to canonical files"
        );
        // The same executable by its path is the same program.
        let out = s
            .call(
                json!({"command": sh.display().to_string(), "args": ["-c", "echo ok"]}),
                ToolContext::detached(),
            )
            .await
            .unwrap();
        assert_eq!(out["stdout"], "ok\n");
        // A program of the same name elsewhere is not: a look-alike `echo` in a temp dir.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("echo");
        std::fs::write(&fake, "#!/bin/sh\necho pwned\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let err = s
            .call(
                json!({"command": fake.display().to_string()}),
                ToolContext::detached(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "access_denied");
        // A symlink to an allowed program is that program (resolved), one to another is not.
        let link = dir.path().join("my-sh");
        std::os::unix::fs::symlink(&sh, &link).unwrap();
        assert!(
            s.call(
                json!({"command": link.display().to_string(), "args": ["-c", "true"]}),
                ToolContext::detached(),
            )
            .await
            .is_ok()
        );
    }

    #[tokio::test]
    async fn the_environment_is_cleared_but_for_the_documented_list() {
        // What `sh` sets by itself.
        let shell_own = ["PWD", "SHLVL", "_", "OLDPWD"];
        let parent: Vec<String> = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| !PASSED_ENV.contains(&k.as_str()) && !shell_own.contains(&k.as_str()))
            .collect();
        assert!(
            !parent.is_empty(),
            "the test runs with variables beyond the list"
        );
        let out = shell()
            .call(
                json!({"command": "sh", "args": ["-c", "env"]}),
                ToolContext::detached(),
            )
            .await
            .unwrap();
        let env = out["stdout"].as_str().unwrap();
        for k in &parent {
            assert!(
                !env.lines().any(|l| l.starts_with(&format!("{k}="))),
                "{k} leaked"
            );
        }
        for line in env.lines() {
            let name = line.split('=').next().unwrap();
            assert!(
                PASSED_ENV.contains(&name) || shell_own.contains(&name),
                "unexpected variable {name} in {env}"
            );
        }
        assert!(env.lines().any(|l| l.starts_with("PATH=")));
    }
}

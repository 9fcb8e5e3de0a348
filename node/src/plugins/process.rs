//! One run of a plugin process over stdio: spawned directly (no shell) in a process group of
//! its own, its input written to stdin and stdin closed, stdout kept up to
//! [`MAX_STDOUT_BYTES`], the last [`STDERR_TAIL_BYTES`] of stderr kept.
//!
//! No process outlives its run: when the leader exits, whatever it left in its group is
//! SIGKILLed; past the timeout the whole group is SIGKILLed and the leader reaped; when the
//! run's future is dropped (task cancelled, executor timeout) the [`Group`] guard SIGKILLs the
//! group and tokio reaps the leader in the background (`kill_on_drop`). Grandchildren that
//! die are reaped by init, their parent being gone. A plugin that wants a process to outlive
//! its answer (an asynchronous plugin's worker) must start it in a new session (`setsid`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// Most bytes of stdout kept (1 MiB); more makes the run fail (see [`Output::stdout_truncated`]).
pub const MAX_STDOUT_BYTES: usize = 1024 * 1024;
/// Bytes of stderr kept: the last 2 KiB.
pub const STDERR_TAIL_BYTES: usize = 2048;
/// How long output is still read after the leader exited and its group was killed: a process
/// of another session (a detached worker) may still hold the pipes open.
pub const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The program: a path, or a bare name looked up in the child's `PATH`.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// The working directory (the plugin's directory).
    pub cwd: PathBuf,
    /// The whole environment of the process (nothing else is inherited).
    pub env: Vec<(OsString, OsString)>,
    /// Written to stdin, which is then closed.
    pub stdin: Vec<u8>,
    /// Budget of the run.
    pub timeout: Duration,
}

/// How a run ended.
#[derive(Debug)]
pub struct Output {
    /// The leader's exit status.
    pub status: ExitStatus,
    /// Stdout, at most [`MAX_STDOUT_BYTES`].
    pub stdout: Vec<u8>,
    /// Whether stdout was longer (the rest was read and dropped).
    pub stdout_truncated: bool,
    /// The last [`STDERR_TAIL_BYTES`] of stderr.
    pub stderr_tail: Vec<u8>,
}

/// Why a run gave no [`Output`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be started.
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        /// The program as the manifest names it.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The run passed its timeout; its process group was killed.
    #[error("ran past its timeout of {} ms and was killed", .0.as_millis())]
    Timeout(Duration),
    /// Waiting for the process failed.
    #[error("waiting for the plugin process: {0}")]
    Wait(std::io::Error),
}

/// The process group of a running plugin: SIGKILLed when dropped unless [`Group::disarm`]ed.
/// Holds the leader so that, dropped after the kill, tokio reaps it.
struct Group {
    pgid: Option<Pid>,
    child: Child,
}

impl Group {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid {
            // ESRCH: the group is already empty.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }

    /// Kills what is left of the group and stops the guard from killing again (the leader is
    /// reaped, so its id may be reused).
    fn finish(&mut self) {
        self.kill();
        self.pgid = None;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // The leader is killed again and reaped by tokio (`kill_on_drop`) when `child` drops.
        self.kill();
    }
}

/// Runs `spec` to its end or its timeout.
///
/// # Errors
/// [`Error::Spawn`], [`Error::Timeout`] (the group is killed and the leader reaped before this
/// returns), [`Error::Wait`].
pub async fn run(spec: Spec) -> Result<Output, Error> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        program: spec.program.display().to_string(),
        source,
    })?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut group = Group { pgid, child };

    let mut out = Vec::new();
    let mut out_truncated = false;
    let mut err = Tail::default();
    let input = spec.stdin;
    let timed = tokio::time::timeout(spec.timeout, async {
        let feed = async move {
            if let Some(mut pipe) = stdin {
                // A plugin that exits without reading its input is not an error.
                let _ = pipe.write_all(&input).await;
                let _ = pipe.shutdown().await;
            }
        };
        let io = async {
            tokio::join!(
                feed,
                read_capped(stdout, &mut out, &mut out_truncated),
                read_tail(stderr, &mut err)
            )
        };
        tokio::pin!(io);
        let mut io_done = false;
        let status = loop {
            tokio::select! {
                _ = &mut io, if !io_done => io_done = true,
                status = group.child.wait() => break status,
            }
        };
        // The leader is reaped: kill anything it left in its group, which closes their ends
        // of the pipes, then take the rest of the output.
        group.finish();
        if !io_done {
            let _ = tokio::time::timeout(DRAIN_GRACE, &mut io).await;
        }
        status
    })
    .await;
    match timed {
        Ok(Ok(status)) => Ok(Output {
            status,
            stdout: out,
            stdout_truncated: out_truncated,
            stderr_tail: err.into_bytes(),
        }),
        Ok(Err(e)) => Err(Error::Wait(e)),
        Err(_) => {
            group.kill();
            // SIGKILL cannot be caught: the wait is short.
            let _ = group.child.wait().await;
            group.pgid = None;
            Err(Error::Timeout(spec.timeout))
        }
    }
}

/// Reads to the end into `kept`, keeping the first [`MAX_STDOUT_BYTES`] and reading on so the
/// writer never blocks on a full pipe. A read error ends the reading.
async fn read_capped<R: AsyncRead + Unpin>(
    pipe: Option<R>,
    kept: &mut Vec<u8>,
    truncated: &mut bool,
) {
    let Some(mut pipe) = pipe else { return };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let room = MAX_STDOUT_BYTES - kept.len();
        if n > room {
            kept.extend_from_slice(&chunk[..room]);
            *truncated = true;
        } else {
            kept.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The last [`STDERR_TAIL_BYTES`] written.
#[derive(Default)]
struct Tail {
    buf: Vec<u8>,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > STDERR_TAIL_BYTES {
            let cut = self.buf.len() - STDERR_TAIL_BYTES;
            self.buf.drain(..cut);
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

async fn read_tail<R: AsyncRead + Unpin>(pipe: Option<R>, tail: &mut Tail) {
    let Some(mut pipe) = pipe else { return };
    let mut chunk = vec![0u8; 4 * 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => tail.push(&chunk[..n]),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> Spec {
        Spec {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())],
            stdin: b"{\"x\": 1}".to_vec(),
            timeout,
        }
    }

    #[tokio::test]
    async fn stdin_is_the_input_and_output_is_captured() {
        let o = run(sh("cat; echo oops >&2; exit 3", Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(o.stdout, b"{\"x\": 1}");
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(o.stderr_tail, b"oops\n");
        assert!(!o.stdout_truncated);
    }

    #[tokio::test]
    async fn stderr_keeps_its_tail_and_stdout_is_capped() {
        let o = run(sh(
            "head -c 3000000 /dev/zero; i=0; while [ $i -lt 500 ]; do echo line$i >&2; i=$((i+1)); done",
            Duration::from_secs(30),
        ))
        .await
        .unwrap();
        assert_eq!(o.stdout.len(), MAX_STDOUT_BYTES);
        assert!(o.stdout_truncated);
        assert!(o.stderr_tail.len() <= STDERR_TAIL_BYTES);
        assert!(String::from_utf8_lossy(&o.stderr_tail).ends_with("line499\n"));
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        // The leader starts a background sleeper in its group, then waits.
        let script = format!(
            "sleep 300 & echo $! > {p}.tmp; echo $$ >> {p}.tmp; mv {p}.tmp {p}; wait",
            p = pids.display()
        );
        let e = run(sh(&script, Duration::from_millis(500)))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        let text = std::fs::read_to_string(&pids).unwrap();
        for pid in text.split_whitespace() {
            assert!(gone(pid.parse().unwrap()).await, "process {pid} survived");
        }
    }

    #[tokio::test]
    async fn leftovers_of_a_finished_run_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sleep 300 >/dev/null 2>&1 & echo $! > {p}.tmp; mv {p}.tmp {p}; echo done",
            p = pid_file.display()
        );
        let o = run(sh(&script, Duration::from_secs(30))).await.unwrap();
        assert_eq!(o.stdout, b"done\n");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(gone(pid.trim().parse().unwrap()).await, "sleeper survived");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let mut spec = sh("true", Duration::from_secs(5));
        spec.program = "/nonexistent/plugin-binary".into();
        assert!(matches!(run(spec).await, Err(Error::Spawn { .. })));
    }

    /// Whether `pid` is gone or a zombie (its parent being init, which reaps it), polled a while.
    pub(crate) async fn gone(pid: i32) -> bool {
        for _ in 0..500 {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return true,
                Ok(stat) => {
                    let state = stat
                        .rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().next());
                    if state == Some("Z") {
                        return true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

//! A real `redis-server` for tests, on a free loopback port, without persistence, killed on
//! drop. Only `std`: the hub's tests include this file with `#[path]`.
//!
//! If `redis-server` is not installed, [`RedisServer::start`] fails with a message saying to run
//! `scripts/test.sh` (which installs it): tests never skip silently.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: Option<std::path::PathBuf>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers `PING`.
    ///
    /// # Errors
    /// The binary is missing (run `scripts/test.sh`), or the server does not answer in 10 s.
    pub fn start() -> Result<Self, String> {
        Self::start_in(None)
    }

    /// Starts `redis-server` with an append-only file in `dir`, fsynced on every write, so a
    /// [`RedisServer::restart`] keeps the data.
    ///
    /// # Errors
    /// As [`RedisServer::start`].
    pub fn start_persistent(dir: &std::path::Path) -> Result<Self, String> {
        Self::start_in(Some(dir.to_owned()))
    }

    fn start_in(dir: Option<std::path::PathBuf>) -> Result<Self, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let mut s = Self {
            child: None,
            port,
            dir,
        };
        s.spawn()?;
        Ok(s)
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL) and waits for it to exit. Its data is gone (no persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty).
    ///
    /// # Errors
    /// As [`RedisServer::start`].
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &self.port.to_string()]).args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ]);
            match &self.dir {
                None => cmd.args(["--appendonly", "no"]),
                Some(d) => cmd
                    .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                    .arg(d),
            };
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        "redis-server is not installed: run scripts/test.sh, which installs it \
                         (apt-get install redis-server)"
                            .to_owned()
                    } else {
                        format!("cannot start redis-server: {e}")
                    }
                })?;
            self.child = Some(child);
            while Instant::now() < deadline {
                if ping(self.port) {
                    return Ok(());
                }
                if let Some(c) = &mut self.child
                    && let Ok(Some(_)) = c.try_wait()
                {
                    // Exited (port briefly still in use after a restart): try again.
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!(
                    "redis-server on port {} did not answer PING within 10 s",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

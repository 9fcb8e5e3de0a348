//! Readiness waits: poll a condition at a short interval until it holds or a deadline passes.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Overall deadline of readiness waits: generous, so a loaded 2-core machine does not flake.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Interval between two polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` every 20 ms until it returns `Ok(Some(value))`, and returns that value.
///
/// An `Err` from `check` does not stop the wait (the thing polled may not be up yet); it is
/// reported in the timeout error if the deadline passes.
///
/// # Errors
/// When `timeout` passes first: the message names `what` and the last error seen.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what} (last error: {e:#})")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

//! systemd service notifications (`Type=notify`): `READY=1` once the node is set up and
//! starts connecting (not once a hub answers: a hub that is down must not fail the unit's
//! start), `STOPPING=1` when it begins to drain, and `WATCHDOG=1` pings while
//! `WATCHDOG_USEC` is set. The shell tool's programs never see these variables. Every
//! function does nothing when the node does not run under systemd (`NOTIFY_SOCKET` unset).

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `READY=1` and a `STATUS=` line (e.g. the hubs it connects to) to the service manager.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Sends `STOPPING=1` (the service manager then waits for the process to exit).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// The interval at which to ping the watchdog: half of `WATCHDOG_USEC` (when it is set and
/// `WATCHDOG_PID` is unset or this process), at least 10 ms. `None` without a watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| (d / 2).max(Duration::from_millis(10)))
}

/// When systemd's watchdog is on, spawns a task on the current runtime that sends
/// `WATCHDOG=1` every [`watchdog_interval`]: a stalled runtime stops the pings and systemd
/// restarts the node. Returns `None` (and spawns nothing) without a watchdog.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let every = watchdog_interval()?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

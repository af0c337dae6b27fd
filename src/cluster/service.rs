//! A node as a systemd service (`systemd/loip.service`, `Type=notify`):
//! readiness, status and the watchdog through sd_notify, and log lines the
//! journal files under the right priority.
//!
//! Outside systemd (`$NOTIFY_SOCKET` and `$JOURNAL_STREAM` unset) nothing
//! here changes what the node does.

use std::io::Write;
use std::time::Duration;

use sd_notify::NotifyState;

/// Tells the service manager the node is up: its QUIC endpoint is bound and
/// it answers `loip status`. Until then systemd holds the unit in
/// "activating", and ordering (`After=loip.service`) waits.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager the node is shutting down.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// The watchdog period systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Pings the watchdog at half its period from a task on the node's runtime,
/// so a runtime that stops making progress (a deadlock, a blocked worker)
/// stops the pings and systemd restarts the node. Returns `None` when no
/// watchdog is configured.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let period = watchdog_period()?;
    let every = (period / 2).max(Duration::from_millis(100));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }))
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        log::warn!("sd_notify: {e}");
    }
}

/// Whether standard error is connected to the journal (systemd sets
/// `$JOURNAL_STREAM` for a service whose output goes there).
pub fn logging_to_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Writes a log record as the journal reads it from a stream: a `<N>`
/// syslog priority prefix, no timestamp (the journal adds its own).
pub fn journal_line(
    out: &mut impl Write,
    level: log::Level,
    target: &str,
    args: &std::fmt::Arguments,
) -> std::io::Result<()> {
    let priority = match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    };
    writeln!(out, "<{priority}>{target}: {args}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_carry_syslog_priorities() {
        let mut out = Vec::new();
        journal_line(
            &mut out,
            log::Level::Warn,
            "loip::store",
            &format_args!("database set aside"),
        )
        .unwrap();
        journal_line(&mut out, log::Level::Error, "loip", &format_args!("x")).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<4>loip::store: database set aside\n<3>loip: x\n"
        );
    }
}

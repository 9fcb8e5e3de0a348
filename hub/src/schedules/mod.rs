//! Schedules: a task to submit or a notification to send, at a cron time (`croner`, with an
//! optional seconds field, in an IANA time zone) or once at a `run_at` time. Records of kind
//! [`SCHEDULE`] in the record store (memory, redb, or Redis shared by every hub); HTTP in
//! `http::schedules`.
//!
//! Rules:
//! - **Owner.** A schedule belongs to the principal that created it; others are told it does
//!   not exist; admins see all. A fire acts as the owner ([`Principal::acting_for`]).
//! - **Exactly once per due time, with any number of hubs.** Every hub runs [`run_loop`]. A
//!   fire is claimed with `compare_and_set` on the schedule's record: the bytes read are
//!   replaced by the record with `next_fire` advanced; only the hub whose write lands fires.
//!   A task fire is submitted *before* the claim with the idempotency key
//!   `schedule:<id>:<due ms>` (scoped to the owner), so a hub that loses the claim, or dies
//!   between submit and claim, gets the same task back and no second one exists. A
//!   notification is sent only by the winner, after its claim (at most once).
//! - **Missed fires.** A due time more than [`MISSED_AFTER`] in the past when a hub first
//!   sees it (every hub was down) is fired once (`catch_up: true`, the default) or skipped
//!   (`catch_up: false`); either way the schedule continues from the next future time. Due
//!   times that passed together coalesce into one fire.
//! - **`run_at`** fires once; the schedule is then done (`next_fire: null`) and kept, with its
//!   `last_fire` and `last_task_id`.
//!
//! [`plan`] is the pure step (no clock, no I/O); the loop feeds it the time.

use std::str::FromStr;
use std::time::Duration;

use chrono::{SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::TaskSpec;
use crate::notify::{Notification, Notifier};
use crate::principal::Principal;
use crate::records::{Kind, RecordStore};
use crate::store;
use crate::tasks::TaskService;

/// Schedules by id (JSON of [`Schedule`]).
pub const SCHEDULE: Kind = "schedule";

/// How late a due time may be seen and still count as on time; later, it was missed.
pub const MISSED_AFTER: Duration = Duration::from_secs(5);

/// How often each hub looks for due schedules.
pub const TICK: Duration = Duration::from_millis(250);

/// Most characters of a schedule's `name` and a notification's `title`.
pub const MAX_NAME_CHARS: usize = 256;
/// Most characters of a notification's `body`.
pub const MAX_BODY_CHARS: usize = 4096;

/// Why a schedule call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is not acceptable; `param` names it.
    #[error("{message}")]
    Invalid {
        /// The field (`cron`, `run_at`, `timezone`, `name`, …).
        param: &'static str,
        /// Why, for people.
        message: String,
    },
    /// No such schedule (or one the caller may not see).
    #[error("schedule `{0}` not found")]
    NotFound(String),
    /// The record store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

fn invalid(param: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        param,
        message: message.into(),
    }
}

/// What a fire does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Submit this task as the owner (its idempotency key is set per fire).
    Task {
        /// The validated task.
        spec: TaskSpec,
    },
    /// Send this notification to the owner's client WebSockets.
    Notification {
        /// Its title.
        title: String,
        /// Its body.
        body: String,
    },
}

impl Action {
    /// `task` or `notification` (the `action` label of `apex_schedule_fires_total`).
    pub fn label(&self) -> &'static str {
        match self {
            Action::Task { .. } => "task",
            Action::Notification { .. } => "notification",
        }
    }
}

/// A stored schedule. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Id (UUID).
    pub id: String,
    /// The creating principal's id.
    pub owner: String,
    /// A label.
    pub name: String,
    /// The cron expression (5 fields, or 6 with seconds first), if recurring.
    pub cron: Option<String>,
    /// The one time of a one-off schedule.
    pub run_at_ms: Option<i64>,
    /// IANA time zone the cron expression is read in.
    pub timezone: String,
    /// Whether a fire missed while every hub was down happens once at start-up.
    pub catch_up: bool,
    /// What a fire does.
    pub action: Action,
    /// The next due time; `None` once a `run_at` schedule is done.
    pub next_fire_ms: Option<i64>,
    /// The last fire's time.
    pub last_fire_ms: Option<i64>,
    /// The task the last task fire submitted.
    pub last_task_id: Option<String>,
    /// Why the last fire did not submit its task, if it did not.
    pub last_error: Option<String>,
    /// Fires so far.
    pub fires: u64,
    /// Missed fires skipped (`catch_up: false`).
    pub skipped: u64,
    /// Creation time.
    pub created_at_ms: i64,
}

/// A schedule as the API shows it (times RFC 3339, UTC).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ScheduleView {
    /// Id.
    pub id: String,
    /// Owner (`user:<id>`, `key:<id>` or `admin`).
    pub owner: String,
    /// Label.
    pub name: String,
    /// Cron expression, for recurring schedules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The one time of a one-off schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_at: Option<String>,
    /// IANA time zone of `cron`.
    pub timezone: String,
    /// Whether a missed fire happens once at start-up.
    pub catch_up: bool,
    /// The task a fire submits (`tool`, `args`, `priority`, `timeout_seconds`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub task: Option<serde_json::Value>,
    /// The notification a fire sends (`title`, `body`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub notification: Option<serde_json::Value>,
    /// The next due time; `null` once a `run_at` schedule is done.
    pub next_fire: Option<String>,
    /// Whether it will not fire again (`run_at` fired or skipped).
    pub done: bool,
    /// The last fire's time.
    pub last_fire: Option<String>,
    /// The task the last fire submitted.
    pub last_task_id: Option<String>,
    /// Why the last fire submitted no task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Fires so far.
    pub fires: u64,
    /// Missed fires skipped.
    pub skipped: u64,
    /// Creation time.
    pub created_at: String,
}

/// RFC 3339 (UTC, milliseconds) of Unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl Schedule {
    /// The API view.
    pub fn view(&self) -> ScheduleView {
        let (task, notification) = match &self.action {
            Action::Task { spec } => (
                Some(serde_json::json!({
                    "tool": spec.tool,
                    "args": spec.args,
                    "description": spec.description,
                    "priority": spec.priority,
                    "timeout_seconds": spec.timeout_seconds,
                    "max_attempts": spec.max_attempts,
                    "node_id": spec.pinned_node,
                    "capability": spec.capability,
                })),
                None,
            ),
            Action::Notification { title, body } => (
                None,
                Some(serde_json::json!({"title": title, "body": body})),
            ),
        };
        ScheduleView {
            id: self.id.clone(),
            owner: self.owner.clone(),
            name: self.name.clone(),
            cron: self.cron.clone(),
            run_at: self.run_at_ms.map(rfc3339),
            timezone: self.timezone.clone(),
            catch_up: self.catch_up,
            task,
            notification,
            next_fire: self.next_fire_ms.map(rfc3339),
            done: self.next_fire_ms.is_none(),
            last_fire: self.last_fire_ms.map(rfc3339),
            last_task_id: self.last_task_id.clone(),
            last_error: self.last_error.clone(),
            fires: self.fires,
            skipped: self.skipped,
            created_at: rfc3339(self.created_at_ms),
        }
    }
}

/// When a schedule fires: a cron expression or one time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// A cron expression (5 fields, or 6 with seconds first).
    Cron(String),
    /// An RFC 3339 time.
    RunAt(String),
}

/// A schedule to create, as the handler validated its shape.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    /// Label, 1 to [`MAX_NAME_CHARS`] characters.
    pub name: String,
    /// When.
    pub when: When,
    /// IANA time zone name; `None`: UTC.
    pub timezone: Option<String>,
    /// Default true.
    pub catch_up: Option<bool>,
    /// What.
    pub action: Action,
}

/// A parsed cron expression (seconds optional) or the error naming `cron`.
///
/// # Errors
/// [`Error::Invalid`] naming `cron`.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, Error> {
    croner::Cron::from_str(expr.trim()).map_err(|e| {
        invalid(
            "cron",
            format!("`cron` is not a valid cron expression: {e}"),
        )
    })
}

/// The first time of `cron` in `tz` strictly after `after_ms`; `None` if there is none.
pub fn next_after(cron: &croner::Cron, tz: chrono_tz::Tz, after_ms: i64) -> Option<i64> {
    let t = tz.timestamp_millis_opt(after_ms).single()?;
    cron.find_next_occurrence(&t, false)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// What a hub does with a schedule at `now_ms` ([`plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not due (or done).
    Wait,
    /// Fire for `due_ms`, then continue at `next_ms` (`None`: done).
    Fire {
        /// The due time fired.
        due_ms: i64,
        /// The following due time.
        next_ms: Option<i64>,
    },
    /// A missed due time of a `catch_up: false` schedule: skip it, continue at `next_ms`.
    Skip {
        /// The due time skipped.
        due_ms: i64,
        /// The following due time.
        next_ms: Option<i64>,
    },
}

/// The pure step of a schedule at `now_ms`: whether it is due, whether the due time was
/// missed (more than `missed_after_ms` ago), and the next due time after now (due times that
/// passed meanwhile coalesce into this one step).
pub fn plan(s: &Schedule, now_ms: i64, missed_after_ms: i64) -> Step {
    let Some(due_ms) = s.next_fire_ms else {
        return Step::Wait;
    };
    if due_ms > now_ms {
        return Step::Wait;
    }
    let next_ms = s.cron.as_deref().and_then(|c| {
        let cron = parse_cron(c).ok()?;
        let tz = chrono_tz::Tz::from_str(&s.timezone).unwrap_or(chrono_tz::UTC);
        next_after(&cron, tz, now_ms.max(due_ms))
    });
    if now_ms - due_ms > missed_after_ms && !s.catch_up {
        Step::Skip { due_ms, next_ms }
    } else {
        Step::Fire { due_ms, next_ms }
    }
}

/// The schedules of this hub's record store. Cheap to clone.
#[derive(Clone)]
pub struct Schedules {
    records: RecordStore,
    tasks: TaskService,
    notifier: Notifier,
}

impl Schedules {
    /// Schedules in `records`, firing through `tasks` and `notifier`.
    pub fn new(records: RecordStore, tasks: TaskService, notifier: Notifier) -> Self {
        Self {
            records,
            tasks,
            notifier,
        }
    }

    /// Validates `new` and stores it as `caller`'s schedule.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `name`, `cron`, `run_at`, `timezone` or `notification.*`;
    /// [`Error::Store`].
    pub async fn create(&self, caller: &Principal, new: NewSchedule) -> Result<Schedule, Error> {
        let now = apex_protocol::now_ms();
        let name = new.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
            return Err(invalid(
                "name",
                format!("`name` must be 1 to {MAX_NAME_CHARS} characters"),
            ));
        }
        let tz_name = new.timezone.unwrap_or_else(|| "UTC".to_owned());
        let tz = chrono_tz::Tz::from_str(&tz_name).map_err(|_| {
            invalid(
                "timezone",
                format!("`timezone` must be an IANA time zone name such as Europe/Paris, not `{tz_name}`"),
            )
        })?;
        if let Action::Notification { title, body } = &new.action {
            if title.is_empty() || title.chars().count() > MAX_NAME_CHARS {
                return Err(invalid(
                    "notification.title",
                    format!("`notification.title` must be 1 to {MAX_NAME_CHARS} characters"),
                ));
            }
            if body.chars().count() > MAX_BODY_CHARS {
                return Err(invalid(
                    "notification.body",
                    format!("`notification.body` must be at most {MAX_BODY_CHARS} characters"),
                ));
            }
        }
        let (cron, run_at_ms, next) = match new.when {
            When::Cron(expr) => {
                let c = parse_cron(&expr)?;
                let next = next_after(&c, tz, now)
                    .ok_or_else(|| invalid("cron", "`cron` has no future time"))?;
                (Some(expr.trim().to_owned()), None, next)
            }
            When::RunAt(at) => {
                let t = chrono::DateTime::parse_from_rfc3339(at.trim()).map_err(|e| {
                    invalid("run_at", format!("`run_at` must be an RFC 3339 time: {e}"))
                })?;
                let ms = t.timestamp_millis();
                // A time already past fires at once (on time, not as a missed fire).
                (None, Some(ms), ms.max(now))
            }
        };
        let s = Schedule {
            id: uuid::Uuid::new_v4().to_string(),
            owner: caller.owner().to_owned(),
            name,
            cron,
            run_at_ms,
            timezone: tz.name().to_owned(),
            catch_up: new.catch_up.unwrap_or(true),
            action: new.action,
            next_fire_ms: Some(next),
            last_fire_ms: None,
            last_task_id: None,
            last_error: None,
            fires: 0,
            skipped: 0,
            created_at_ms: now,
        };
        let bytes = encode(&s)?;
        self.records.put(SCHEDULE, &s.id, &bytes, None).await?;
        Ok(s)
    }

    /// Schedule `id` if `caller` may see it.
    ///
    /// # Errors
    /// [`Error::NotFound`] (also for another owner's); [`Error::Store`].
    pub async fn get(&self, caller: &Principal, id: &str) -> Result<Schedule, Error> {
        let raw = self
            .records
            .get(SCHEDULE, id)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        match decode(&raw) {
            Some(s) if caller.sees(Some(&s.owner)) => Ok(s),
            _ => Err(Error::NotFound(id.to_owned())),
        }
    }

    /// The caller's schedules (admins: all), newest first (ties by id).
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn list(&self, caller: &Principal) -> Result<Vec<Schedule>, Error> {
        let mut out: Vec<Schedule> = self
            .records
            .list(SCHEDULE)
            .await?
            .iter()
            .filter_map(|(_, raw)| decode(raw))
            .filter(|s| caller.sees(Some(&s.owner)))
            .collect();
        out.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// Deletes schedule `id` if `caller` may see it.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Store`].
    pub async fn delete(&self, caller: &Principal, id: &str) -> Result<(), Error> {
        self.get(caller, id).await?;
        if !self.records.delete(SCHEDULE, id).await? {
            return Err(Error::NotFound(id.to_owned()));
        }
        Ok(())
    }

    /// Looks at every schedule once and fires (or skips) those due at `now_ms`. Returns the
    /// earliest future due time seen.
    async fn sweep(&self, now_ms: i64) -> Result<Option<i64>, store::Error> {
        let mut earliest: Option<i64> = None;
        for (_, raw) in self.records.list(SCHEDULE).await? {
            let Some(s) = decode(&raw) else { continue };
            let step = plan(&s, now_ms, MISSED_AFTER.as_millis() as i64);
            let next = match step {
                Step::Wait => s.next_fire_ms,
                Step::Fire { next_ms, .. } | Step::Skip { next_ms, .. } => {
                    self.step(&raw, s, step, now_ms).await;
                    next_ms
                }
            };
            if let Some(n) = next {
                earliest = Some(earliest.map_or(n, |e| e.min(n)));
            }
        }
        Ok(earliest)
    }

    /// Claims and performs one fire or skip of `s` (read as `raw`).
    async fn step(&self, raw: &[u8], s: Schedule, step: Step, now_ms: i64) {
        let mut next = s.clone();
        let label = s.action.label();
        let outcome = match step {
            Step::Wait => return,
            Step::Skip { due_ms, next_ms } => {
                next.next_fire_ms = next_ms;
                next.skipped += 1;
                if !self.claim(raw, &next).await {
                    return;
                }
                tracing::info!(
                    schedule_id = %s.id,
                    due = %rfc3339(due_ms),
                    "missed schedule fire skipped (catch_up is false)"
                );
                "skipped"
            }
            Step::Fire { due_ms, next_ms } => {
                next.next_fire_ms = next_ms;
                next.last_fire_ms = Some(now_ms);
                next.fires += 1;
                match &s.action {
                    Action::Task { spec } => {
                        let mut spec = spec.clone();
                        spec.idempotency_key = Some(format!("schedule:{}:{due_ms}", s.id));
                        let owner = Principal::acting_for(&s.owner);
                        match self.tasks.submit(&owner, vec![spec]).await {
                            Ok(mut out) => {
                                next.last_task_id = out.pop().map(|(t, _)| t.id.to_string());
                                next.last_error = None;
                            }
                            // Nothing was accepted: try again at the next tick.
                            Err(
                                e @ (crate::tasks::Error::StoreUnavailable(_)
                                | crate::tasks::Error::ShuttingDown),
                            ) => {
                                tracing::warn!(schedule_id = %s.id, error = %e, "schedule fire not submitted; retrying");
                                return;
                            }
                            Err(e) => {
                                next.last_task_id = None;
                                next.last_error = Some(e.to_string());
                            }
                        }
                        if !self.claim(raw, &next).await {
                            return;
                        }
                        if next.last_error.is_some() {
                            "failed"
                        } else {
                            "fired"
                        }
                    }
                    Action::Notification { title, body } => {
                        if !self.claim(raw, &next).await {
                            return;
                        }
                        self.notifier
                            .notify(
                                &s.owner,
                                Notification {
                                    title: title.clone(),
                                    body: body.clone(),
                                    task_id: None,
                                },
                            )
                            .await;
                        "fired"
                    }
                }
            }
        };
        crate::metrics::get()
            .schedule_fires
            .with_label_values(&[label, outcome])
            .inc();
    }

    /// Replaces `raw` by `next` if nobody changed it meanwhile: true if this hub won the fire.
    async fn claim(&self, raw: &[u8], next: &Schedule) -> bool {
        let Ok(bytes) = encode(next) else {
            return false;
        };
        match self
            .records
            .compare_and_set(SCHEDULE, &next.id, Some(raw), Some(&bytes), None)
            .await
        {
            Ok(won) => won,
            Err(e) => {
                tracing::warn!(schedule_id = %next.id, error = %e, "schedule fire not claimed");
                false
            }
        }
    }
}

fn encode(s: &Schedule) -> Result<Vec<u8>, store::Error> {
    serde_json::to_vec(s).map_err(|e| store::Error::Unavailable {
        what: "schedule".to_owned(),
        reason: e.to_string(),
    })
}

fn decode(raw: &[u8]) -> Option<Schedule> {
    serde_json::from_slice(raw).ok()
}

/// Fires due schedules until `stop`: every [`TICK`], when the record kind's version moved
/// (a schedule created, fired or deleted at any hub) or the earliest known due time passed.
pub async fn run_loop(schedules: Schedules, mut stop: watch::Receiver<bool>) {
    let mut seen: Option<u64> = None;
    let mut earliest: Option<i64> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let version = match schedules.records.version(SCHEDULE).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "schedules not read");
                continue;
            }
        };
        let now = apex_protocol::now_ms();
        if seen == Some(version) && earliest.is_none_or(|e| e > now) {
            continue;
        }
        match schedules.sweep(now).await {
            Ok(e) => {
                earliest = e;
                seen = Some(version);
            }
            Err(e) => tracing::warn!(error = %e, "schedules not swept"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sched(cron: Option<&str>, next: Option<i64>, catch_up: bool) -> Schedule {
        Schedule {
            id: "s".into(),
            owner: "user:a".into(),
            name: "n".into(),
            cron: cron.map(Into::into),
            run_at_ms: cron.is_none().then_some(next.unwrap_or(0)),
            timezone: "UTC".into(),
            catch_up,
            action: Action::Notification {
                title: "t".into(),
                body: "b".into(),
            },
            next_fire_ms: next,
            last_fire_ms: None,
            last_task_id: None,
            last_error: None,
            fires: 0,
            skipped: 0,
            created_at_ms: 0,
        }
    }

    const MIN: i64 = 60_000;

    #[test]
    fn a_run_at_fires_once_when_due_and_is_then_done() {
        let s = sched(None, Some(10_000), true);
        assert_eq!(plan(&s, 9_999, 5_000), Step::Wait);
        assert_eq!(
            plan(&s, 10_100, 5_000),
            Step::Fire {
                due_ms: 10_000,
                next_ms: None
            }
        );
        let done = sched(None, None, true);
        assert_eq!(plan(&done, i64::MAX, 5_000), Step::Wait);
    }

    #[test]
    fn missed_fires_catch_up_once_or_skip_then_continue_in_the_future() {
        // Every minute; due at minute 1, seen at minute 10 (every hub was down).
        let late = 10 * MIN + 30_000;
        let s = sched(Some("* * * * *"), Some(MIN), true);
        assert_eq!(
            plan(&s, late, 5_000),
            Step::Fire {
                due_ms: MIN,
                next_ms: Some(11 * MIN)
            }
        );
        let s = sched(Some("* * * * *"), Some(MIN), false);
        assert_eq!(
            plan(&s, late, 5_000),
            Step::Skip {
                due_ms: MIN,
                next_ms: Some(11 * MIN)
            }
        );
        // On time (within the grace): fired even without catch-up.
        assert!(matches!(
            plan(&s, MIN + 200, 5_000),
            Step::Fire { next_ms: Some(n), .. } if n == 2 * MIN
        ));
    }

    #[test]
    fn cron_takes_seconds_and_time_zones() {
        let every_second = parse_cron("* * * * * *").unwrap();
        assert_eq!(
            next_after(&every_second, chrono_tz::UTC, 1_500),
            Some(2_000)
        );
        let nine = parse_cron("0 9 * * *").unwrap();
        let paris: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
        // 2026-01-01T00:00:00Z → 09:00 in Paris is 08:00 UTC (winter).
        let jan1 = 1_767_225_600_000;
        assert_eq!(next_after(&nine, paris, jan1), Some(jan1 + 8 * 60 * MIN));
        let bad = parse_cron("61 * * * *");
        assert!(
            matches!(&bad, Err(Error::Invalid { param: "cron", message }) if message.contains("cron")),
            "{bad:?}"
        );
    }
}

//! Rate limits per caller and route class ([`Limiter`]), exact across hubs.
//!
//! - **Algorithm.** The generic cell rate algorithm, pure, in [`gcra`]; a bucket is one number
//!   (its theoretical arrival time). "N per minute" admits N at once from a full bucket, then
//!   one every 60/N s.
//! - **Buckets.** One per (bucket kind, caller): a route's [`RouteClass`] names its buckets
//!   ([`Bucket`]): `standard`, `execute`, `test`, and for the LLM gateway `llm` (requests) with
//!   `llm_tokens` (tokens, charged after each call from its usage: [`Limiter::charge_tokens`]).
//!   The caller is [`Principal::id`]; a managed key's own `rate_limit` replaces
//!   `standard_per_minute` for it (0, like every `*_per_minute`, is unlimited). Config-file keys (the `admin` caller) are exempt unless
//!   `apply_to_admin` (see [`RateLimits`]).
//! - **Stores** ([`Buckets`]): in memory ([`MemoryBuckets`]: a sharded map of caller → TAT per
//!   bucket kind, stale entries swept by [`Limiter::sweep_loop`]) for a hub alone; in Redis
//!   ([`RedisBuckets`]: one atomic `scripts/gcra.lua` call per check on Redis's own clock, keys
//!   `apex:rl:<bucket>:<caller>` expiring when full) in shared mode, so N per minute admits N
//!   whichever hubs the requests reach. Both run the same checks
//!   (`hub/tests/limits_conformance.rs`).
//! - **Store failures** (Redis down): `on_store_error` allows (default) or denies; each is
//!   counted in `apex_rate_limit_store_errors_total`, and logged once per outage.
//!
//! A check of several buckets (requests and tokens) is all or nothing: a request refused for
//! its tokens takes no request either. The HTTP side (headers, 429, 503) is
//! `http::rate_limit`; this module has no HTTP types.

mod gcra;
mod memory;
mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

pub use self::gcra::{Verdict, charge, gcra};
pub use self::memory::MemoryBuckets;
pub use self::redis::RedisBuckets;
pub use crate::config::{OnStoreError, RateLimits};
use crate::principal::{Principal, PrincipalKind};

/// How often [`Limiter::sweep_loop`] drops in-memory buckets that are full again.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// A failure of the store of the counts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis did not answer or refused the script.
    #[error("rate-limit store {what} unavailable: {reason}")]
    Unavailable {
        /// The Redis URL without its password.
        what: String,
        /// The cause, on one line.
        reason: String,
    },
    /// The script answered something that is not its reply shape.
    #[error("rate-limit store answered an unexpected reply: {0}")]
    BadReply(String),
    /// A check named one bucket twice (in memory: one bucket kind twice).
    #[error("bucket `{0}` appears twice in one check")]
    DuplicateBucket(&'static str),
}

/// What a route is limited as. Routes are classified by [`RouteClass::of`]; a route not listed
/// there is [`RouteClass::Standard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    /// Every API route without a class of its own (`standard_per_minute`).
    Standard,
    /// Routes that start research runs (`execute_per_minute`).
    Execute,
    /// `/test` routes (`test_per_minute`).
    Test,
    /// `POST /v1/chat/completions`: requests (`llm_requests_per_minute`) and tokens
    /// (`llm_tokens_per_minute`).
    Llm,
}

impl RouteClass {
    /// The class of the route matched as `route` (the router's pattern, e.g.
    /// `/api/v1/tasks/{id}`, never a raw path). New routes of another class add their
    /// pattern here; everything else is standard.
    pub fn of(route: &str) -> RouteClass {
        match route {
            "/v1/chat/completions" => RouteClass::Llm,
            "/api/research/sessions/{id}/execute" | "/api/v2/query" => RouteClass::Execute,
            "/api/agents/profiles/{id}/test" => RouteClass::Test,
            _ => RouteClass::Standard,
        }
    }

    /// The label of `apex_rate_limited_total{class}` and the name in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Standard => "standard",
            RouteClass::Execute => "execute",
            RouteClass::Test => "test",
            RouteClass::Llm => "llm",
        }
    }
}

/// A kind of bucket: one per caller and kind. Its name is the `<bucket>` of the Redis key
/// `apex:rl:<bucket>:<caller>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    /// Requests of [`RouteClass::Standard`] routes.
    Standard,
    /// Requests of [`RouteClass::Execute`] routes.
    Execute,
    /// Requests of [`RouteClass::Test`] routes.
    Test,
    /// Requests of [`RouteClass::Llm`] routes.
    LlmRequests,
    /// Tokens used through [`RouteClass::Llm`] routes.
    LlmTokens,
    /// Login attempts per email (`POST /api/v1/auth/login`, against password guessing).
    LoginEmail,
    /// Login attempts per client address.
    LoginAddr,
}

impl Bucket {
    /// Every kind, in lock order (a check takes its buckets in this order).
    pub const ALL: [Bucket; 7] = [
        Bucket::Standard,
        Bucket::Execute,
        Bucket::Test,
        Bucket::LlmRequests,
        Bucket::LlmTokens,
        Bucket::LoginEmail,
        Bucket::LoginAddr,
    ];

    /// The name in keys: `standard`, `execute`, `test`, `llm`, `llm_tokens`, `login_email`,
    /// `login_addr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Standard => "standard",
            Bucket::Execute => "execute",
            Bucket::Test => "test",
            Bucket::LlmRequests => "llm",
            Bucket::LlmTokens => "llm_tokens",
            Bucket::LoginEmail => "login_email",
            Bucket::LoginAddr => "login_addr",
        }
    }

    /// Position in [`Bucket::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The Redis key of `bucket` for `caller`: `apex:rl:<bucket>:<caller>`.
pub fn key(bucket: Bucket, caller: &str) -> String {
    format!("apex:rl:{}:{caller}", bucket.as_str())
}

/// A rate of `per_minute` units a minute (at least 1), as GCRA parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    per_minute: u32,
}

impl Rate {
    /// `per_minute` units a minute; `None` for 0 (unlimited). Rates above
    /// [`RateLimits::MAX_PER_MINUTE`] are capped there.
    pub fn per_minute(per_minute: u32) -> Option<Rate> {
        (per_minute > 0).then(|| Rate {
            per_minute: per_minute.min(RateLimits::MAX_PER_MINUTE),
        })
    }

    /// Units a minute (the `X-RateLimit-Limit` figure).
    pub fn limit(self) -> u32 {
        self.per_minute
    }

    /// µs between two units.
    pub fn emission_us(self) -> u64 {
        60_000_000 / u64::from(self.per_minute.max(1))
    }

    /// Units a full bucket holds: the limit.
    pub fn burst(self) -> u64 {
        u64::from(self.per_minute)
    }
}

/// One bucket of a check.
#[derive(Debug, Clone, Copy)]
pub struct BucketCheck<'a> {
    /// Its kind.
    pub bucket: Bucket,
    /// The caller ([`Principal::id`]).
    pub caller: &'a str,
    /// Its rate.
    pub rate: Rate,
    /// Units to take (0: only check that one is left).
    pub cost: u64,
}

/// How a check takes its costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Take every bucket's cost only if every bucket admits it.
    Check,
    /// Take every cost whatever is left (usage already spent); always admitted.
    Charge,
}

/// One bucket's state after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Left {
    /// Whole units left.
    pub remaining: u64,
    /// µs until the bucket is full again.
    pub reset_after_us: u64,
    /// µs until the same check would be admitted (0 if it was).
    pub retry_after_us: u64,
}

impl From<Verdict> for Left {
    fn from(v: Verdict) -> Self {
        Left {
            remaining: v.remaining,
            reset_after_us: v.reset_after_us,
            retry_after_us: v.retry_after_us,
        }
    }
}

/// The result of one check over its buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether every bucket admitted its cost (and each was taken).
    pub admitted: bool,
    /// The store's clock at the check, µs since the Unix epoch.
    pub now_us: u64,
    /// Each bucket's state, in the order of the check.
    pub buckets: Vec<Left>,
}

/// Where the counts live: this process, or the Redis every hub shares.
pub enum Buckets {
    /// In memory.
    Memory(Box<MemoryBuckets>),
    /// In Redis.
    Redis(RedisBuckets),
}

impl Buckets {
    /// Runs one check of `checks` in `mode`, at `now_us` (µs since the epoch) or on the
    /// store's own clock when `None` (tests pass a clock). The buckets must be distinct; in
    /// memory at most one of each kind (a check holds one entry of each kind's map, and two
    /// entries of one map could share a lock), in Redis any distinct keys (token charges of
    /// many callers go in one call).
    ///
    /// # Errors
    /// [`Error::Unavailable`] / [`Error::BadReply`] from Redis; [`Error::DuplicateBucket`].
    pub async fn check(
        &self,
        checks: &[BucketCheck<'_>],
        mode: Mode,
        now_us: Option<u64>,
    ) -> Result<Outcome, Error> {
        match self {
            Buckets::Memory(m) => m.check(checks, mode, now_us),
            Buckets::Redis(r) => r.check(checks, mode, now_us).await,
        }
    }
}

/// One bucket's figures as the response headers carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// The limit, units a minute.
    pub limit: u32,
    /// Units left.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset_after: Duration,
    /// When the bucket is full again, Unix seconds (rounded up).
    pub reset_at: u64,
    /// When refused by this bucket: time until the same request would be admitted.
    pub retry_after: Option<Duration>,
}

impl Quota {
    fn new(rate: Rate, left: Left, now_us: u64) -> Self {
        Quota {
            limit: rate.limit(),
            remaining: left.remaining,
            reset_after: Duration::from_micros(left.reset_after_us),
            reset_at: now_us
                .saturating_add(left.reset_after_us)
                .div_ceil(1_000_000),
            retry_after: (left.retry_after_us > 0)
                .then(|| Duration::from_micros(left.retry_after_us)),
        }
    }
}

/// A check's figures: the class's request bucket and, for [`RouteClass::Llm`], its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The route's class.
    pub class: RouteClass,
    /// Its request bucket (`None`: requests unlimited).
    pub requests: Option<Quota>,
    /// Its token bucket (LLM class with a token limit).
    pub tokens: Option<Quota>,
}

impl Decision {
    /// Whole seconds (at least 1, rounded up) until a refused request would be admitted: the
    /// longest wait of the buckets that refused it.
    pub fn retry_after_secs(&self) -> u64 {
        let wait = [self.requests, self.tokens]
            .into_iter()
            .flatten()
            .filter_map(|q| q.retry_after)
            .max()
            .unwrap_or_default();
        wait.as_micros().div_ceil(1_000_000).max(1) as u64
    }

    /// A sentence saying which limit refused the request.
    pub fn message(&self) -> String {
        let class = self.class.as_str();
        let wait = self.retry_after_secs();
        match (self.requests, self.tokens) {
            (_, Some(t)) if t.retry_after.is_some() => format!(
                "rate limit exceeded: the token budget of {} tokens per minute for `{class}` \
                 routes is used up; retry in {wait} s",
                t.limit
            ),
            (Some(r), _) => format!(
                "rate limit exceeded: {} requests per minute for `{class}` routes; retry in \
                 {wait} s",
                r.limit
            ),
            _ => format!("rate limit exceeded for `{class}` routes; retry in {wait} s"),
        }
    }
}

/// What [`Limiter::check`] decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Not limited (limits off, an exempt admin caller, or every bucket of the class is
    /// unlimited): no headers.
    Unlimited,
    /// Admitted; the figures go in the response headers.
    Admitted(Decision),
    /// Over the limit: 429 with these figures.
    Refused(Decision),
    /// The store failed; what `on_store_error` says to do (already counted and logged).
    StoreFailed(OnStoreError),
}

/// The rate limiter of the API routes: the config in force and the store of the counts.
/// Shared by every request (`Arc`); one check is one map operation in memory, or one script
/// call in Redis.
pub struct Limiter {
    config: RwLock<Arc<RateLimits>>,
    buckets: Buckets,
    health: Arc<Health>,
    /// Token charges to Redis, sent by [`charge_loop`] (`None` in memory).
    charges: Option<tokio::sync::mpsc::UnboundedSender<Charge>>,
}

/// Whether the last store operation failed, so an outage is logged once, and its end.
#[derive(Default)]
struct Health {
    failing: AtomicBool,
}

impl Health {
    fn ok(&self) {
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("rate-limit store available again");
        }
    }

    /// Counts a failure; `action` says what requests get meanwhile.
    fn failed(&self, e: &Error, action: &str) {
        crate::metrics::get().rate_limit_store_errors.inc();
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "rate-limit store failed: {action} until it is back");
        }
    }
}

/// Tokens one call of `caller` used, to charge at `rate`.
struct Charge {
    caller: String,
    rate: Rate,
    tokens: u64,
}

/// Most callers charged by one script call of [`charge_loop`].
const CHARGES_PER_CALL: usize = 256;

/// Sends token charges to Redis: one script call at a time, carrying every charge that arrived
/// while the previous one ran, summed per caller. Idle, a charge goes out at once; under load
/// charges share calls, so a chat completion costs Redis one check and a fraction of a charge.
/// Ends when the limiter (the sender) is dropped.
async fn charge_loop(
    buckets: RedisBuckets,
    health: Arc<Health>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Charge>,
) {
    while let Some(first) = rx.recv().await {
        let mut pending: Vec<Charge> = vec![first];
        while pending.len() < CHARGES_PER_CALL {
            let Ok(c) = rx.try_recv() else { break };
            match pending.iter_mut().find(|p| p.caller == c.caller) {
                Some(p) => {
                    p.tokens = p.tokens.saturating_add(c.tokens);
                    p.rate = c.rate;
                }
                None => pending.push(c),
            }
        }
        let checks: Vec<BucketCheck<'_>> = pending
            .iter()
            .map(|c| BucketCheck {
                bucket: Bucket::LlmTokens,
                caller: &c.caller,
                rate: c.rate,
                cost: c.tokens,
            })
            .collect();
        match buckets.check(&checks, Mode::Charge, None).await {
            Ok(_) => health.ok(),
            Err(e) => health.failed(&e, "token usage is not charged"),
        }
    }
}

impl Limiter {
    /// A limiter counting in this process.
    pub fn memory(config: RateLimits) -> Self {
        Self::with(config, Buckets::Memory(Box::default()))
    }

    /// A limiter counting in the Redis at `url` (shared mode), on a connection of its own.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if Redis cannot be reached.
    /// Token charges go out on a task of its own (see `charge_loop`), so this must run on a
    /// Tokio runtime.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if Redis cannot be reached.
    pub async fn redis(url: &str, config: RateLimits) -> Result<Self, Error> {
        let buckets = RedisBuckets::connect(url).await?;
        let mut limiter = Self::with(config, Buckets::Redis(buckets.clone()));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(charge_loop(buckets, limiter.health.clone(), rx));
        limiter.charges = Some(tx);
        Ok(limiter)
    }

    /// A limiter over `buckets` (token charges to Redis then go out one task each).
    pub fn with(config: RateLimits, buckets: Buckets) -> Self {
        Self {
            config: RwLock::new(Arc::new(config)),
            buckets,
            health: Arc::default(),
            charges: None,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> Arc<RateLimits> {
        self.config.read().clone()
    }

    /// Replaces the limits (config reload). Counts are kept: a bucket's state is a time, so a
    /// new rate applies to it at once.
    pub fn set_config(&self, config: RateLimits) {
        *self.config.write() = Arc::new(config);
    }

    /// The store of the counts.
    pub fn buckets(&self) -> &Buckets {
        &self.buckets
    }

    /// The request and token rates that apply to `principal` on a route of `class`, or
    /// `None` when it is not limited there at all.
    fn rates(
        cfg: &RateLimits,
        principal: &Principal,
        class: RouteClass,
    ) -> Option<(Option<Rate>, Option<Rate>)> {
        if !cfg.enabled || (principal.kind == PrincipalKind::Admin && !cfg.apply_to_admin) {
            return None;
        }
        let rates = match class {
            RouteClass::Standard => (
                Rate::per_minute(principal.rate_limit.unwrap_or(cfg.standard_per_minute)),
                None,
            ),
            RouteClass::Execute => (Rate::per_minute(cfg.execute_per_minute), None),
            RouteClass::Test => (Rate::per_minute(cfg.test_per_minute), None),
            RouteClass::Llm => (
                Rate::per_minute(cfg.llm_requests_per_minute),
                Rate::per_minute(cfg.llm_tokens_per_minute),
            ),
        };
        (rates.0.is_some() || rates.1.is_some()).then_some(rates)
    }

    /// The request bucket of `class`.
    fn request_bucket(class: RouteClass) -> Bucket {
        match class {
            RouteClass::Standard => Bucket::Standard,
            RouteClass::Execute => Bucket::Execute,
            RouteClass::Test => Bucket::Test,
            RouteClass::Llm => Bucket::LlmRequests,
        }
    }

    /// Checks one request of `principal` on a route of `class`: takes one request from its
    /// bucket and, for the LLM class, checks that a token is left (tokens are charged after
    /// the call by [`Limiter::charge_tokens`]). Store failures are counted and logged here.
    pub async fn check(&self, principal: &Principal, class: RouteClass) -> Admission {
        let cfg = self.config();
        let Some((requests, tokens)) = Self::rates(&cfg, principal, class) else {
            return Admission::Unlimited;
        };
        let mut checks = Vec::with_capacity(2);
        if let Some(rate) = requests {
            checks.push(BucketCheck {
                bucket: Self::request_bucket(class),
                caller: &principal.id,
                rate,
                cost: 1,
            });
        }
        if let Some(rate) = tokens {
            checks.push(BucketCheck {
                bucket: Bucket::LlmTokens,
                caller: &principal.id,
                rate,
                cost: 0,
            });
        }
        let outcome = match self.buckets.check(&checks, Mode::Check, None).await {
            Ok(o) => {
                self.store_ok();
                o
            }
            Err(e) => {
                self.store_failed(&e);
                return Admission::StoreFailed(cfg.on_store_error);
            }
        };
        let mut quotas = checks
            .iter()
            .zip(&outcome.buckets)
            .map(|(c, l)| Quota::new(c.rate, *l, outcome.now_us));
        let decision = Decision {
            class,
            requests: requests.and_then(|_| quotas.next()),
            tokens: tokens.and_then(|_| quotas.next()),
        };
        if outcome.admitted {
            Admission::Admitted(decision)
        } else {
            crate::metrics::get()
                .rate_limited
                .with_label_values(&[class.as_str()])
                .inc();
            Admission::Refused(decision)
        }
    }

    /// Checks one login attempt (`POST /api/v1/auth/login`) against `login_per_minute` for
    /// its lower-cased `email` and for the client address `addr` (both must admit it; a
    /// refusal takes from neither). Applies to everyone, whatever `apply_to_admin` says:
    /// logins carry no credential. `Unlimited` when limits are off or the rate is 0.
    pub async fn check_login(&self, email: &str, addr: &str) -> Admission {
        let cfg = self.config();
        let Some(rate) = Rate::per_minute(cfg.login_per_minute).filter(|_| cfg.enabled) else {
            return Admission::Unlimited;
        };
        let email = email.trim().to_lowercase();
        let checks = [
            BucketCheck {
                bucket: Bucket::LoginEmail,
                caller: &email,
                rate,
                cost: 1,
            },
            BucketCheck {
                bucket: Bucket::LoginAddr,
                caller: addr,
                rate,
                cost: 1,
            },
        ];
        match self.buckets.check(&checks, Mode::Check, None).await {
            Ok(out) => {
                self.health.ok();
                // The figures of the tighter of the two buckets.
                let left = out
                    .buckets
                    .iter()
                    .copied()
                    .min_by_key(|l| (l.remaining, std::cmp::Reverse(l.retry_after_us)))
                    .unwrap_or(Left {
                        remaining: 0,
                        reset_after_us: 0,
                        retry_after_us: 0,
                    });
                let decision = Decision {
                    class: RouteClass::Standard,
                    requests: Some(Quota::new(rate, left, out.now_us)),
                    tokens: None,
                };
                if out.admitted {
                    Admission::Admitted(decision)
                } else {
                    crate::metrics::get()
                        .rate_limited
                        .with_label_values(&["login"])
                        .inc();
                    Admission::Refused(decision)
                }
            }
            Err(e) => {
                let action = match cfg.on_store_error {
                    OnStoreError::Allow => "logins are let through",
                    OnStoreError::Deny => "logins are refused",
                };
                self.health.failed(&e, action);
                Admission::StoreFailed(cfg.on_store_error)
            }
        }
    }

    /// Whether `principal`'s LLM calls have a token budget (so their usage must be reported
    /// and charged).
    pub fn limits_tokens(&self, principal: &Principal) -> bool {
        Self::rates(&self.config(), principal, RouteClass::Llm).is_some_and(|(_, t)| t.is_some())
    }

    /// Charges `tokens` used by one LLM call of `principal` to its token bucket, whatever is
    /// left (the call has happened): its next call is refused while the bucket is in debt.
    /// In memory at once; in Redis by the charging task (the caller is a stream being
    /// polled, which must not wait), usually within one Redis round trip. A failure is counted
    /// and logged like a check's.
    pub fn charge_tokens(self: &Arc<Self>, principal: &Principal, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let Some((_, Some(rate))) = Self::rates(&self.config(), principal, RouteClass::Llm) else {
            return;
        };
        match &self.buckets {
            Buckets::Memory(m) => {
                m.charge(Bucket::LlmTokens, &principal.id, rate, tokens, None);
            }
            Buckets::Redis(_) if self.charges.is_some() => {
                if let Some(tx) = &self.charges {
                    let _ = tx.send(Charge {
                        caller: principal.id.clone(),
                        rate,
                        tokens,
                    });
                }
            }
            Buckets::Redis(_) => {
                let (this, caller) = (self.clone(), principal.id.clone());
                tokio::spawn(async move {
                    let check = [BucketCheck {
                        bucket: Bucket::LlmTokens,
                        caller: &caller,
                        rate,
                        cost: tokens,
                    }];
                    match this.buckets.check(&check, Mode::Charge, None).await {
                        Ok(_) => this.store_ok(),
                        Err(e) => this.store_failed(&e),
                    }
                });
            }
        }
    }

    /// Drops in-memory buckets that are full again (no-op for Redis, whose keys expire).
    /// Returns how many were dropped.
    pub fn sweep(&self) -> usize {
        match &self.buckets {
            Buckets::Memory(m) => m.sweep(),
            Buckets::Redis(_) => 0,
        }
    }

    /// Runs [`Limiter::sweep`] every [`SWEEP_INTERVAL`], forever.
    pub async fn sweep_loop(self: Arc<Self>) {
        if matches!(self.buckets, Buckets::Redis(_)) {
            return;
        }
        loop {
            tokio::time::sleep(SWEEP_INTERVAL).await;
            let n = self.sweep();
            if n > 0 {
                tracing::debug!(dropped = n, "full rate-limit buckets dropped");
            }
        }
    }

    fn store_ok(&self) {
        self.health.ok();
    }

    fn store_failed(&self, e: &Error) {
        let action = match self.config().on_store_error {
            OnStoreError::Allow => "allowing requests it cannot count (on_store_error)",
            OnStoreError::Deny => "refusing requests it cannot count (on_store_error)",
        };
        self.health.failed(e, action);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key_user(limit: Option<u32>) -> Principal {
        Principal {
            id: "key:k1".to_owned(),
            kind: PrincipalKind::Key,
            scopes: Vec::new(),
            credential: Some("k1".to_owned()),
            rate_limit: limit,
        }
    }

    fn cfg(f: impl FnOnce(&mut RateLimits)) -> RateLimits {
        let mut c = RateLimits::default();
        f(&mut c);
        c
    }

    #[test]
    fn routes_are_standard_unless_listed() {
        assert_eq!(RouteClass::of("/v1/chat/completions"), RouteClass::Llm);
        for r in [
            "/api/v1/tasks",
            "/api/v1/tasks/{id}",
            "/v1/models",
            "/metrics",
            "",
        ] {
            assert_eq!(RouteClass::of(r), RouteClass::Standard, "{r}");
        }
    }

    #[test]
    fn rates_are_exact_per_minute() {
        let r = Rate::per_minute(100).unwrap();
        assert_eq!((r.emission_us(), r.burst(), r.limit()), (600_000, 100, 100));
        assert_eq!(Rate::per_minute(0), None);
        let max = Rate::per_minute(u32::MAX).unwrap();
        assert_eq!(max.emission_us(), 1);
        assert_eq!(
            key(Bucket::LlmTokens, "user:u"),
            "apex:rl:llm_tokens:user:u"
        );
    }

    #[tokio::test]
    async fn admin_is_exempt_unless_configured_and_a_key_limit_overrides_the_standard() {
        let l = Limiter::memory(cfg(|c| c.standard_per_minute = 2));
        let admin = Principal::admin();
        for _ in 0..5 {
            assert_eq!(
                l.check(&admin, RouteClass::Standard).await,
                Admission::Unlimited
            );
        }
        l.set_config(cfg(|c| {
            c.standard_per_minute = 2;
            c.apply_to_admin = true;
        }));
        assert!(matches!(
            l.check(&admin, RouteClass::Standard).await,
            Admission::Admitted(_)
        ));
        // A managed key with its own limit of 3: 3 admitted, remaining 2, 1, 0, then refused.
        let key = key_user(Some(3));
        let mut remaining = Vec::new();
        for _ in 0..3 {
            match l.check(&key, RouteClass::Standard).await {
                Admission::Admitted(d) => {
                    let q = d.requests.unwrap();
                    assert_eq!(q.limit, 3);
                    remaining.push(q.remaining);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(remaining, [2, 1, 0]);
        let Admission::Refused(d) = l.check(&key, RouteClass::Standard).await else {
            panic!("the fourth is refused")
        };
        // 3 a minute: the next one in 20 s.
        assert_eq!(d.retry_after_secs(), 20);
        assert!(
            d.message().contains("3 requests per minute"),
            "{}",
            d.message()
        );
        // Classes count apart: the LLM bucket of the same key is untouched.
        assert!(matches!(
            l.check(&key, RouteClass::Llm).await,
            Admission::Admitted(_)
        ));
        // Turned off: nothing is limited.
        l.set_config(cfg(|c| c.enabled = false));
        assert_eq!(
            l.check(&key, RouteClass::Standard).await,
            Admission::Unlimited
        );
    }

    #[tokio::test]
    async fn tokens_are_charged_after_the_call_and_refuse_the_next_one() {
        // 6 tokens a minute: one every 10 s, far longer than this test takes.
        let l = Arc::new(Limiter::memory(cfg(|c| {
            c.llm_requests_per_minute = 100;
            c.llm_tokens_per_minute = 6;
        })));
        let key = key_user(None);
        assert!(l.limits_tokens(&key));
        let Admission::Admitted(d) = l.check(&key, RouteClass::Llm).await else {
            panic!()
        };
        let t = d.tokens.unwrap();
        assert_eq!((t.limit, t.remaining, t.retry_after), (6, 6, None));
        assert_eq!(d.requests.unwrap().remaining, 99);
        l.charge_tokens(&key, 5);
        let Admission::Admitted(d) = l.check(&key, RouteClass::Llm).await else {
            panic!()
        };
        assert_eq!(d.tokens.unwrap().remaining, 1);
        l.charge_tokens(&key, 7);
        let Admission::Refused(d) = l.check(&key, RouteClass::Llm).await else {
            panic!("over the token budget")
        };
        // 6 tokens over the budget, then one to have something left: 70 s.
        assert_eq!(d.retry_after_secs(), 70);
        assert!(d.message().contains("token budget"), "{}", d.message());
        // The refusal took no request.
        assert_eq!(d.requests.unwrap().remaining, 98);
        // A caller without a token budget is not charged.
        l.set_config(cfg(|c| c.llm_tokens_per_minute = 0));
        assert!(!l.limits_tokens(&key));
    }

    #[test]
    fn the_retry_wait_rounds_up_to_whole_seconds() {
        let q = |retry_us: u64| Quota {
            limit: 1,
            remaining: 0,
            reset_after: Duration::ZERO,
            reset_at: 0,
            retry_after: (retry_us > 0).then(|| Duration::from_micros(retry_us)),
        };
        let d = |r, t| Decision {
            class: RouteClass::Llm,
            requests: Some(q(r)),
            tokens: Some(q(t)),
        };
        assert_eq!(d(1, 0).retry_after_secs(), 1);
        assert_eq!(d(1_000_001, 0).retry_after_secs(), 2);
        assert_eq!(d(2_000_000, 5_500_000).retry_after_secs(), 6);
        assert_eq!(d(0, 0).retry_after_secs(), 1);
    }
}

//! One conformance suite for the two rate-limit stores: the in-memory buckets of a hub alone and
//! `gcra.lua` on a real `redis-server` (shared mode). The same checks run against both at the
//! same clock (the store is given `now`), and a long random sequence of checks and charges must
//! give the same answers from both, so the Lua script and `limits::gcra` stay one algorithm.
//! Then the Redis store on its own clock: keys expire when full, and concurrent checks from
//! several connections (several hubs) admit exactly the limit.
#![allow(clippy::unwrap_used)]

#[path = "../../tests/src/redis.rs"]
#[allow(dead_code)]
mod redis_server;

use apex_hub::limits::{Bucket, BucketCheck, Buckets, Left, Mode, Outcome, Rate, RedisBuckets};
use redis_server::RedisServer;

/// Some instant, µs since the epoch.
const NOW: u64 = 1_700_000_000_000_000;

async fn stores(redis: &RedisServer) -> Vec<(&'static str, Buckets)> {
    vec![
        ("memory", Buckets::Memory(Box::default())),
        (
            "redis",
            Buckets::Redis(RedisBuckets::connect(&redis.url()).await.unwrap()),
        ),
    ]
}

fn one(bucket: Bucket, caller: &str, per_minute: u32, cost: u64) -> BucketCheck<'_> {
    BucketCheck {
        bucket,
        caller,
        rate: Rate::per_minute(per_minute).unwrap(),
        cost,
    }
}

async fn at(b: &Buckets, checks: &[BucketCheck<'_>], mode: Mode, now: u64) -> Outcome {
    b.check(checks, mode, Some(now)).await.unwrap()
}

#[tokio::test]
async fn a_fresh_bucket_admits_exactly_its_limit_then_one_per_interval() {
    let redis = RedisServer::start().unwrap();
    for (name, b) in stores(&redis).await {
        let c = [one(Bucket::Standard, "key:a", 100, 1)];
        let mut remaining = Vec::new();
        for _ in 0..100 {
            let o = at(&b, &c, Mode::Check, NOW).await;
            assert!(o.admitted, "{name}");
            assert_eq!(o.now_us, NOW, "{name}");
            remaining.push(o.buckets[0].remaining);
        }
        assert_eq!(remaining, (0..100).rev().collect::<Vec<u64>>(), "{name}");
        let refused = at(&b, &c, Mode::Check, NOW).await;
        assert!(!refused.admitted, "{name}");
        assert_eq!(
            refused.buckets[0],
            Left {
                remaining: 0,
                reset_after_us: 60_000_000,
                retry_after_us: 600_000
            },
            "{name}"
        );
        for i in 1..=5u64 {
            let now = NOW + i * 600_000;
            assert!(!at(&b, &c, Mode::Check, now - 1).await.admitted, "{name}");
            assert!(at(&b, &c, Mode::Check, now).await.admitted, "{name}");
            assert!(!at(&b, &c, Mode::Check, now).await.admitted, "{name}");
        }
        // Another caller, and another bucket of the same caller, are untouched.
        for c in [
            one(Bucket::Standard, "key:b", 100, 1),
            one(Bucket::Execute, "key:a", 100, 1),
        ] {
            assert_eq!(
                at(&b, &[c], Mode::Check, NOW).await.buckets[0].remaining,
                99
            );
        }
    }
}

#[tokio::test]
async fn a_check_of_two_buckets_takes_both_or_neither() {
    let redis = RedisServer::start().unwrap();
    for (name, b) in stores(&redis).await {
        let req = one(Bucket::LlmRequests, "user:u", 10, 1);
        let tok = |cost| one(Bucket::LlmTokens, "user:u", 100, cost);
        // Tokens spent past the budget (a charge always lands).
        let o = at(&b, &[tok(150)], Mode::Charge, NOW).await;
        assert!(o.admitted, "{name}");
        assert_eq!(o.buckets[0].remaining, 0, "{name}");
        // 50 over, plus one token to have something left: 51 × 600 ms.
        assert_eq!(o.buckets[0].retry_after_us, 51 * 600_000, "{name}");
        let o = at(&b, &[req, tok(0)], Mode::Check, NOW).await;
        assert!(!o.admitted, "{name}");
        // The request bucket admitted by itself, but nothing was taken from it.
        assert_eq!(o.buckets[0].remaining, 10, "{name}");
        assert_eq!(o.buckets[0].retry_after_us, 0, "{name}");
        assert_eq!(o.buckets[1].retry_after_us, 51 * 600_000, "{name}");
        let o = at(&b, &[req], Mode::Check, NOW).await;
        assert_eq!(o.buckets[0].remaining, 9, "{name}: still full before");
        // Once paid back, both are taken.
        let later = NOW + 51 * 600_000;
        let o = at(&b, &[req, tok(0)], Mode::Check, later).await;
        assert!(o.admitted, "{name}");
        assert_eq!(o.buckets[1].remaining, 1, "{name}");
    }
}

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test]
async fn memory_and_redis_give_the_same_answers_to_a_random_history() {
    let redis = RedisServer::start().unwrap();
    let all = stores(&redis).await;
    let callers = ["admin", "key:k1", "user:u2"];
    let rates = [1, 3, 7, 100, 1000, 60_000];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut now = NOW;
    let (mut admitted, mut refused) = (0, 0);
    for step in 0..2_000 {
        now += match rng.below(4) {
            0 => 0,
            1 => rng.below(1_000),
            2 => rng.below(2_000_000),
            _ => rng.below(90_000_000),
        };
        let caller = callers[rng.below(3) as usize];
        let rate = rates[rng.below(rates.len() as u64) as usize];
        let cost = match rng.below(4) {
            0 => 0,
            1 | 2 => 1,
            _ => rng.below(u64::from(rate) * 2 + 1),
        };
        let mode = if rng.below(5) == 0 {
            Mode::Charge
        } else {
            Mode::Check
        };
        let mut checks = vec![one(Bucket::LlmRequests, caller, rate, cost.min(1))];
        if rng.below(2) == 0 {
            checks.push(one(Bucket::LlmTokens, caller, rate, cost));
        }
        let mut answers = Vec::new();
        for (_, b) in &all {
            answers.push(at(b, &checks, mode, now).await);
        }
        assert_eq!(
            answers[0], answers[1],
            "step {step}: {checks:?} {mode:?} at {now}"
        );
        if mode == Mode::Check {
            if answers[0].admitted {
                admitted += 1;
            } else {
                refused += 1;
            }
        }
    }
    // The history exercised both answers.
    assert!(
        admitted > 200 && refused > 200,
        "{admitted} admitted, {refused} refused"
    );
}

#[tokio::test]
async fn on_the_redis_clock_keys_expire_when_full_and_hubs_share_one_bucket() {
    let redis = RedisServer::start().unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Three connections: three hubs.
    let hubs = [
        RedisBuckets::connect(&redis.url()).await.unwrap(),
        RedisBuckets::connect(&redis.url()).await.unwrap(),
        RedisBuckets::connect(&redis.url()).await.unwrap(),
    ];
    let c = [one(Bucket::Standard, "key:shared", 100, 1)];
    let checks = (0..300).map(|i| hubs[i % 3].check(&c, Mode::Check, None));
    let outcomes: Vec<Outcome> = futures::future::try_join_all(checks).await.unwrap();
    let mut remaining: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.admitted)
        .map(|o| o.buckets[0].remaining)
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..100).collect::<Vec<u64>>());
    // The key lives as long as the bucket takes to refill: under a minute, not forever.
    let ttl: i64 = redis::cmd("PTTL")
        .arg("apex:rl:standard:key:shared")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=60_000).contains(&ttl), "{ttl}");
    // A cost-0 check writes nothing for a full bucket.
    let peek = [one(Bucket::LlmTokens, "key:peek", 10, 0)];
    assert!(
        hubs[0]
            .check(&peek, Mode::Check, None)
            .await
            .unwrap()
            .admitted
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg("apex:rl:llm_tokens:key:peek")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn a_stopped_redis_is_an_error_not_an_answer() {
    let mut redis = RedisServer::start().unwrap();
    let b = Buckets::Redis(RedisBuckets::connect(&redis.url()).await.unwrap());
    let c = [one(Bucket::Standard, "key:a", 5, 1)];
    assert!(b.check(&c, Mode::Check, None).await.is_ok());
    redis.stop();
    let e = b.check(&c, Mode::Check, None).await.unwrap_err();
    assert!(e.to_string().contains("unavailable"), "{e}");
}

#[tokio::test]
async fn token_charges_reach_redis_and_refuse_the_next_call_at_any_hub() {
    use apex_hub::limits::{Admission, Limiter, RateLimits, RouteClass};
    use apex_hub::principal::{Principal, PrincipalKind};
    let redis = RedisServer::start().unwrap();
    // 6 tokens a minute: one back every 10 s.
    let cfg = RateLimits {
        llm_requests_per_minute: 1000,
        llm_tokens_per_minute: 6,
        ..RateLimits::default()
    };
    let a = std::sync::Arc::new(Limiter::redis(&redis.url(), cfg.clone()).await.unwrap());
    let b = Limiter::redis(&redis.url(), cfg).await.unwrap();
    let key = |id: &str| Principal {
        id: id.to_owned(),
        kind: PrincipalKind::Key,
        scopes: Vec::new(),
        credential: None,
        rate_limit: None,
    };
    let (k1, k2) = (key("key:one"), key("key:two"));
    // Charges of two callers, many at once (they share script calls), at hub A.
    for _ in 0..3 {
        a.charge_tokens(&k1, 3);
        a.charge_tokens(&k2, 1);
    }
    // Hub B sees them: k1 is 3 tokens in debt, k2 has 3 left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let seen = b.check(&k2, RouteClass::Llm).await;
        let Admission::Admitted(d) = seen else {
            panic!("{seen:?}")
        };
        if d.tokens.unwrap().remaining == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "charges not seen: {d:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let Admission::Refused(d) = b.check(&k1, RouteClass::Llm).await else {
        panic!("k1 is over its budget")
    };
    assert_eq!(d.tokens.unwrap().remaining, 0);
    // 3 tokens of debt and one to have something left: 40 s at most.
    assert!((31..=40).contains(&d.retry_after_secs()), "{d:?}");
}

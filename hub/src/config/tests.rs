//! Tests of the layered config: defaults, files, `APEX_*` variables, flags, validation.
#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn defaults_are_valid() {
    Config::default().validate().unwrap();
}

#[test]
fn flags_override_file() {
    let dir = std::env::temp_dir().join(format!("apex-cfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("hub.toml");
    std::fs::write(
        &f,
        "heartbeat_interval_ms = 500\nheartbeat_timeout_ms = 2000\n",
    )
    .unwrap();
    let cli = Cli {
        config: Some(f),
        heartbeat_timeout_ms: Some(4000),
        ..Cli::default()
    };
    let c = Config::load(&cli).unwrap();
    assert_eq!(c.heartbeat_interval_ms, 500);
    assert_eq!(c.heartbeat_timeout_ms, 4000);
}

#[test]
fn rejects_bad_values_naming_the_key() {
    let c = Config {
        heartbeat_timeout_ms: 500,
        ..Config::default()
    };
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("heartbeat_timeout_ms"), "{e}");
    let dir = std::env::temp_dir().join(format!("apex-cfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("hub.toml");
    std::fs::write(&f, "no_such_key = 1\n").unwrap();
    let e = Config::load(&Cli {
        config: Some(f),
        ..Cli::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no_such_key"), "{e}");
}

#[test]
fn shared_hub_mode_needs_a_redis_store() {
    let with = |mode: &str, store: &str| Config {
        hub_mode: mode.to_owned(),
        store: store.to_owned(),
        ..Config::default()
    };
    with("shared", "redis://127.0.0.1:6379/0")
        .validate()
        .unwrap();
    with("single", "redis://127.0.0.1:6379/0")
        .validate()
        .unwrap();
    for (mode, store) in [
        ("shared", "embedded"),
        ("shared", "memory"),
        ("both", "memory"),
    ] {
        let e = with(mode, store).validate().unwrap_err().to_string();
        assert!(e.contains("hub_mode"), "{mode} {store}: {e}");
    }
}

#[test]
fn the_shared_lease_lifetime_is_validated_and_renewed_well_before_it_expires() {
    let with = |ttl| Config {
        shared_lease_ttl_ms: ttl,
        ..Config::default()
    };
    assert_eq!(Config::default().shared_lease_ttl_ms, 5_000);
    assert_eq!(with(5_000).shared_lease_renew(), Duration::from_secs(1));
    assert_eq!(with(500).shared_lease_renew(), Duration::from_millis(100));
    assert_eq!(with(60_000).shared_lease_renew(), Duration::from_secs(1));
    for ttl in [500, 5_000, 600_000] {
        with(ttl).validate().unwrap();
        assert!(with(ttl).shared_lease_renew() < Duration::from_millis(ttl));
    }
    for ttl in [0, 499, 600_001] {
        let e = with(ttl).validate().unwrap_err().to_string();
        assert!(e.contains("shared_lease_ttl_ms"), "{ttl}: {e}");
    }
}

#[test]
fn worker_threads_default_to_half_the_cpus_and_are_bounded() {
    let with = |n| Config {
        worker_threads: n,
        ..Config::default()
    };
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(with(0).effective_worker_threads(), (cpus / 2).max(1));
    assert_eq!(with(3).effective_worker_threads(), 3);
    with(1024).validate().unwrap();
    let e = with(1025).validate().unwrap_err().to_string();
    assert!(e.contains("worker_threads"), "{e}");
}

#[test]
fn environment_variables_are_matched_to_keys_whatever_their_case() {
    let known = ["heartbeat_timeout_ms".to_owned(), "auth".to_owned()];
    assert!(names_config_key("HEARTBEAT_TIMEOUT_MS", &known));
    assert!(names_config_key("AUTH.JWT_SECRET_ENV", &known));
    assert!(names_config_key("auth.access_token_ttl_secs", &known));
    assert!(!names_config_key("HEARTBEAT", &known));
    assert!(!names_config_key("AUTHOR", &known));
    assert!(!names_config_key("BIN_DIR", &known));
}

#[test]
fn the_auth_section_has_documented_defaults_and_bounds() {
    let a = AuthConfig::default();
    assert_eq!(a.access_token_ttl_secs, 1800);
    assert_eq!(a.refresh_token_ttl_secs, 604_800);
    assert_eq!(a.jwt_secret_env, None);
    let with = |auth: AuthConfig| Config {
        auth,
        ..Config::default()
    };
    for (bad, key) in [
        (
            AuthConfig {
                access_token_ttl_secs: 0,
                ..AuthConfig::default()
            },
            "auth.access_token_ttl_secs",
        ),
        (
            AuthConfig {
                refresh_token_ttl_secs: 10,
                ..AuthConfig::default()
            },
            "auth.refresh_token_ttl_secs",
        ),
        (
            AuthConfig {
                jwt_secret_env: Some("NOT A NAME".into()),
                ..AuthConfig::default()
            },
            "auth.jwt_secret_env",
        ),
    ] {
        let e = with(bad).validate().unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
    let dir = std::env::temp_dir().join(format!("apex-cfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("hub.toml");
    std::fs::write(
        &f,
        "[auth]\njwt_secret_env = \"APEX_JWT_SECRET\"\naccess_token_ttl_secs = 60\n",
    )
    .unwrap();
    let c = Config::load(&Cli {
        config: Some(f),
        ..Cli::default()
    })
    .unwrap();
    assert_eq!(c.auth.jwt_secret_env.as_deref(), Some("APEX_JWT_SECRET"));
    assert_eq!(c.auth.access_ttl(), Duration::from_secs(60));
    assert_eq!(c.auth.refresh_token_ttl_secs, 604_800);
}

#[test]
fn rate_limits_are_read_from_the_file_and_validated() {
    let dir = std::env::temp_dir().join(format!("apex-cfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("hub.toml");
    std::fs::write(
        &f,
        "[rate_limits]\napply_to_admin = true\nstandard_per_minute = 7\non_store_error = \"deny\"\n",
    )
    .unwrap();
    let c = Config::load(&Cli {
        config: Some(f.clone()),
        ..Cli::default()
    })
    .unwrap();
    assert!(c.rate_limits.enabled && c.rate_limits.apply_to_admin);
    assert_eq!(c.rate_limits.standard_per_minute, 7);
    assert_eq!(c.rate_limits.llm_tokens_per_minute, 100_000);
    assert_eq!(c.rate_limits.on_store_error, OnStoreError::Deny);
    std::fs::write(&f, "[rate_limits]\non_store_error = \"maybe\"\n").unwrap();
    let e = Config::load(&Cli {
        config: Some(f),
        ..Cli::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("maybe"), "{e}");
    let mut c = Config::default();
    c.rate_limits.llm_tokens_per_minute = RateLimits::MAX_PER_MINUTE + 1;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("rate_limits.llm_tokens_per_minute"), "{e}");
    c.rate_limits.llm_tokens_per_minute = 0;
    c.validate().unwrap();
}

#[test]
fn keys_are_generated_once_and_reused() {
    let dir = std::env::temp_dir().join(format!("apex-keys-{}", uuid::Uuid::new_v4()));
    let mut c = Config {
        data_dir: dir.clone(),
        ..Config::default()
    };
    let g = ensure_keys(&mut c).unwrap();
    let mut c2 = Config {
        data_dir: dir,
        ..Config::default()
    };
    let g2 = ensure_keys(&mut c2).unwrap();
    assert_eq!(g.api_key, g2.api_key);
    assert_eq!(g.node_key, g2.node_key);
    assert_ne!(g.api_key, g.node_key);
}

#[test]
fn discovery_is_off_by_default_and_its_name_is_checked() {
    let c = Config::default();
    assert!(!c.discovery);
    assert_eq!(c.discovery_name, None);
    let named = |n: &str| Config {
        discovery: true,
        discovery_name: Some(n.to_owned()),
        ..Config::default()
    };
    named("living room hub").validate().unwrap();
    for bad in ["", "  ", "a\nb", &"x".repeat(64)] {
        let e = named(bad).validate().unwrap_err().to_string();
        assert!(e.contains("discovery_name"), "{bad:?}: {e}");
    }
    // The flag turns it on over the file's default; unset, it leaves the file alone.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("hub.toml");
    std::fs::write(&f, "discovery = true\ndiscovery_name = \"nas\"\n").unwrap();
    let c = Config::load(&Cli {
        config: Some(f.clone()),
        ..Cli::default()
    })
    .unwrap();
    assert!(c.discovery);
    assert_eq!(c.discovery_name.as_deref(), Some("nas"));
    let c = Config::load(&Cli {
        discovery: true,
        ..Cli::default()
    })
    .unwrap();
    assert!(c.discovery);
}

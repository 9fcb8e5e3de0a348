//! Unit tests of agent profiles over the in-memory record store.

use serde_json::json;

use super::*;
use crate::config::{AgentsConfig, Config};
use crate::principal::Principal;

fn agents(config: Config) -> Agents {
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let state = crate::http::AppState::new(crate::cluster_for(&config), config, stop);
    state.agents
}

fn fields(v: serde_json::Value) -> ProfileFields {
    serde_json::from_value(v).unwrap()
}

#[test]
fn the_defaults_span_the_clusters_with_the_required_types() {
    let t = defaults::templates(&AgentsConfig::default());
    assert_eq!(t.len(), 14);
    for c in CLUSTERS {
        assert!(t.iter().any(|a| a.cluster == c), "no agent of {c}");
    }
    for need in [
        "meta_coordinator",
        "explorer",
        "critic",
        "synthesizer",
        "methodologist",
        "writer",
        "reviewer",
    ] {
        assert!(AGENT_TYPES.contains(&need), "{need}");
    }
    let mc = t
        .iter()
        .find(|a| a.agent_type == "meta_coordinator")
        .unwrap();
    assert_eq!(mc.cluster, "coordination");
    let ex = t.iter().find(|a| a.agent_type == "explorer").unwrap();
    assert_eq!(ex.cluster, "information");
    let mut types: Vec<_> = AGENT_TYPES.to_vec();
    types.sort_unstable();
    types.dedup();
    assert_eq!(types.len(), 14, "agent types are unique");
    for a in &t {
        let p = AgentProfile::from_template(a.clone(), "x".into(), "admin", "");
        validate(&p).unwrap();
        assert!(a.persona.len() > 200, "{} has a real persona", a.agent_type);
        assert!(!a.responsibilities.is_empty());
        assert!(!a.display_name_cn.is_ascii());
    }
}

#[test]
fn agent_types_are_the_defaults_or_custom_snake_case() {
    for ok in ["explorer", "custom_explorer", "custom_deep_learning2"] {
        assert!(valid_agent_type(ok), "{ok}");
    }
    for bad in [
        "",
        "custom_",
        "custom__x",
        "custom_X",
        "custom_a-b",
        "explorer2",
        "Custom_x",
        "custom_x_",
    ] {
        assert!(!valid_agent_type(bad), "{bad}");
    }
}

#[test]
fn default_ids_are_stable_per_owner_and_type() {
    assert_eq!(
        default_id("user:a", "explorer"),
        default_id("user:a", "explorer")
    );
    assert_ne!(
        default_id("user:a", "explorer"),
        default_id("user:b", "explorer")
    );
    assert_ne!(
        default_id("user:a", "explorer"),
        default_id("user:a", "critic")
    );
    assert!(uuid::Uuid::parse_str(&default_id("user:a", "explorer")).is_ok());
}

#[tokio::test]
async fn init_defaults_is_idempotent_and_profiles_are_owned() {
    let a = agents(Config::default());
    let alice = Principal::user("alice", "j1");
    let bob = Principal::user("bob", "j2");
    assert_eq!(a.init_defaults(&alice).await.unwrap(), 14);
    assert_eq!(a.init_defaults(&alice).await.unwrap(), 0);
    assert_eq!(a.list(&alice, None, None).await.unwrap().len(), 14);
    assert!(a.list(&bob, None, None).await.unwrap().is_empty());
    let admin = Principal::admin();
    assert_eq!(a.list(&admin, None, None).await.unwrap().len(), 14);
    let first = &a.list(&alice, None, None).await.unwrap()[0];
    assert_eq!(first.agent_type, "meta_coordinator");
    assert!(matches!(
        a.get(&bob, &first.id).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        a.delete(&alice, &first.id).await,
        Err(Error::Forbidden(_))
    ));
    let info = a.list(&alice, Some("information"), None).await.unwrap();
    assert!(info.iter().all(|p| p.cluster == "information") && !info.is_empty());
    assert!(matches!(
        a.list(&alice, Some("nope"), None).await,
        Err(Error::Invalid {
            param: "cluster",
            ..
        })
    ));
}

#[tokio::test]
async fn create_update_clone_and_validation() {
    let a = agents(Config::default());
    let u = Principal::user("u", "j");
    let bad = a
        .create(&u, fields(json!({"agent_type": "wizard"})))
        .await
        .unwrap_err();
    assert!(
        bad.to_string()
            .starts_with("Invalid agent_type: must be one of [meta_coordinator, planner, explorer"),
        "{bad}"
    );
    let missing = a
        .create(
            &u,
            fields(json!({"agent_type": "custom_x", "display_name": "X", "cluster": "reasoning"})),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        missing,
        Error::Invalid {
            param: "persona",
            ..
        }
    ));
    for (body, param) in [
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": 200_001}), "max_tokens"),
        (json!({"cluster": "elsewhere"}), "cluster"),
        (json!({"display_name": ""}), "display_name"),
        (json!({"traits": [1]}), "traits"),
        (json!({"role_model": "a b"}), "role_model"),
        (json!({"responsibilities": [""]}), "responsibilities"),
    ] {
        let mut f = fields(body.clone());
        f.agent_type = Some("explorer".into());
        match a.create(&u, f).await {
            Err(Error::Invalid { param: p, .. }) => assert_eq!(p, param, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
    }
    let p = a
        .create(
            &u,
            fields(
                json!({"agent_type": "custom_explorer", "display_name": "Custom Explorer",
                "cluster": "information", "persona": "You explore.", "temperature": 0.8,
                "max_tokens": 6000}),
            ),
        )
        .await
        .unwrap();
    assert!(p.is_custom && p.is_enabled);
    assert_eq!(p.max_tokens, 6000);
    let q = a
        .update(
            &u,
            &p.id,
            fields(json!({"temperature": 0.5, "is_enabled": false, "id": "ignored"})),
        )
        .await
        .unwrap();
    assert_eq!(q.temperature, 0.5);
    assert!(!q.is_enabled);
    assert_eq!(q.persona, "You explore.");
    assert_eq!(q.id, p.id);
    let c = a.clone_profile(&u, &p.id).await.unwrap();
    assert_eq!(c.display_name, "Custom Explorer (Clone)");
    assert!(c.is_custom);
    assert_ne!(c.id, p.id);
    a.delete(&u, &c.id).await.unwrap();
    assert!(matches!(a.get(&u, &c.id).await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn resolve_prefers_the_owners_enabled_profile_then_the_template() {
    let config = Config {
        agents: AgentsConfig {
            role_model: "up/big".into(),
            fallback_model: "up/small".into(),
        },
        ..Config::default()
    };
    let a = agents(config);
    let u = Principal::user("u", "j");
    let t = a.resolve(u.owner(), "critic").await.unwrap().unwrap();
    assert!(t.id.is_empty());
    assert_eq!(t.role_model, "up/big");
    assert!(
        a.resolve(u.owner(), "custom_nothing")
            .await
            .unwrap()
            .is_none()
    );
    a.init_defaults(&u).await.unwrap();
    let stored = a.resolve(u.owner(), "critic").await.unwrap().unwrap();
    assert_eq!(stored.id, default_id(u.owner(), "critic"));
    let mine = a
        .create(
            &u,
            fields(json!({"agent_type": "critic", "persona": "Be harsh."})),
        )
        .await
        .unwrap();
    assert_eq!(
        a.resolve(u.owner(), "critic").await.unwrap().unwrap().id,
        mine.id
    );
    a.update(&u, &mine.id, fields(json!({"is_enabled": false})))
        .await
        .unwrap();
    assert_eq!(
        a.resolve(u.owner(), "critic").await.unwrap().unwrap().id,
        stored.id
    );

    let args = a.run_args(
        &stored,
        "check this",
        vec![json!({"task_id": "t1", "output": "x"})],
    );
    assert_eq!(args["model"], "up/big");
    assert_eq!(args["fallback_model"], "up/small");
    assert_eq!(args["task"], "check this");
    assert_eq!(args["agent_type"], "critic");
    assert_eq!(args["inputs"][0]["task_id"], "t1");
    let mut own = stored.clone();
    own.role_model = "up/small".into();
    let args = a.run_args(&own, "x", Vec::new());
    assert_eq!(args["model"], "up/small");
    assert!(
        args.get("fallback_model").is_none(),
        "a fallback equal to the model is dropped"
    );
    assert!(args.get("inputs").is_none());
}

#[tokio::test]
async fn an_empty_configured_model_is_the_gateways_first() {
    let mut config = Config::default();
    config.llm.providers = vec![crate::llm::ProviderConfig {
        name: "mock".into(),
        kind: crate::llm::ProviderKind::Mock,
        ..Default::default()
    }];
    let a = agents(config);
    let p = a.resolve("admin", "writer").await.unwrap().unwrap();
    let (role, fallback) = a.models(&p);
    assert_eq!(role, "mock", "the built-in mock provider");
    assert!(fallback.is_empty());
}

//! Unit tests of identity over the memory record store. Two [`Identity`] handles over one
//! store stand for two hubs of a shared cluster.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::tokens::{Claims, now_secs};
use super::*;
use crate::principal::{PrincipalKind, Scope};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

fn identity(records: &RecordStore) -> Identity {
    Identity::with_secret(records.clone(), &AuthConfig::default(), SECRET)
}

fn registration(email: &str) -> Registration {
    Registration {
        email: email.to_owned(),
        password: "correct horse".to_owned(),
        username: "Ada".to_owned(),
    }
}

/// Unpadded base64url, for hand-made tokens.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn claims(sub: &str, exp: u64) -> Claims {
    Claims {
        sub: sub.to_owned(),
        jti: "fam.rand".to_owned(),
        iat: now_secs(),
        exp,
        scope: "tasks chat agents".to_owned(),
    }
}

#[tokio::test]
async fn a_registered_user_logs_in_and_is_a_user_principal() {
    let records = RecordStore::memory();
    let id = identity(&records);
    let (tokens, user) = id.register(registration("Ada@Example.com")).await.unwrap();
    assert_eq!(tokens.token_type, "bearer");
    assert_eq!(tokens.expires_in, 1800);
    assert_eq!(user.email, "Ada@Example.com");
    let auth = id.authenticate(&tokens.access_token).unwrap();
    assert_eq!(auth.principal.kind, PrincipalKind::User);
    assert_eq!(auth.principal.id, format!("user:{}", user.id));
    assert_eq!(auth.principal.scopes, Scope::USER_ROLE.to_vec());
    let session = auth.session.unwrap();
    assert_eq!(
        auth.principal.credential.as_deref(),
        Some(session.jti.as_str())
    );
    assert_eq!(id.profile(&session.user_id).await.unwrap().user.id, user.id);

    // The email is unique whatever its case; the password is checked.
    assert!(matches!(
        id.register(registration("ada@EXAMPLE.com")).await,
        Err(Error::EmailTaken)
    ));
    let login = |email: &str, password: &str| Login {
        email: email.to_owned(),
        password: password.to_owned(),
    };
    let again = id
        .login(login(" ADA@example.com", "correct horse"))
        .await
        .unwrap();
    assert!(id.authenticate(&again.access_token).is_ok());
    for (email, password) in [
        ("ada@example.com", "wrong horse"),
        ("nobody@example.com", "correct horse"),
        ("not an email", "correct horse"),
    ] {
        assert!(
            matches!(
                id.login(login(email, password)).await,
                Err(Error::WrongCredentials)
            ),
            "{email}"
        );
    }
    // The stored record holds an argon2id hash, never the password.
    let raw = records.get(USER, &user.id).await.unwrap().unwrap();
    let text = String::from_utf8(raw).unwrap();
    assert!(text.contains("$argon2id$"), "{text}");
    assert!(!text.contains("correct horse"));
}

#[tokio::test]
async fn registration_names_the_bad_field() {
    let id = identity(&RecordStore::memory());
    for (email, password, username, param) in [
        ("no-at-sign", "long enough", "u", "email"),
        ("a@nodot", "long enough", "u", "email"),
        ("a b@example.com", "long enough", "u", "email"),
        ("a@example.com", "short", "u", "password"),
        ("a@example.com", "long enough", " ", "username"),
    ] {
        let r = Registration {
            email: email.into(),
            password: password.into(),
            username: username.into(),
        };
        match id.register(r).await {
            Err(Error::Invalid { param: p, .. }) => assert_eq!(p, param, "{email}"),
            other => panic!("{email}: {other:?}"),
        }
    }
}

#[test]
fn tokens_that_are_expired_forged_foreign_or_unsigned_are_refused() {
    let id = identity(&RecordStore::memory());
    let jwt = &id.inner.jwt;
    let (good, _) = jwt.issue("u1", "fam", now_secs()).unwrap();
    assert_eq!(jwt.verify(&good).unwrap().user_id, "u1");

    // Past `exp`, with the right secret: expired, no leeway.
    let (old, c) = jwt.issue("u1", "fam", now_secs() - 1801).unwrap();
    assert!(c.exp < now_secs());
    assert_eq!(jwt.verify(&old), Err(Refusal::Expired));

    // Another secret.
    let foreign = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("u1", now_secs() + 600),
        &EncodingKey::from_secret(b"another secret, another cluster!"),
    )
    .unwrap();
    assert_eq!(jwt.verify(&foreign), Err(Refusal::Invalid));

    // A changed signature, and changed claims under the original signature.
    let (head, sig) = good.rsplit_once('.').unwrap();
    let flipped = if sig.ends_with('A') { "B" } else { "A" };
    let forged = format!("{head}.{}{flipped}", &sig[..sig.len() - 1]);
    assert_eq!(jwt.verify(&forged), Err(Refusal::Invalid));
    let header = head.split('.').next().unwrap();
    let admin = serde_json::to_vec(&claims("admin", now_secs() + 600)).unwrap();
    let swapped = format!("{header}.{}.{sig}", b64url(&admin));
    assert_eq!(jwt.verify(&swapped), Err(Refusal::Invalid));

    // `alg: none`, hand-made, with and without a signature part.
    let none = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64url(&serde_json::to_vec(&claims("u1", now_secs() + 600)).unwrap());
    for t in [
        format!("{none}.{body}."),
        format!("{none}.{body}"),
        format!("{none}.{body}.{sig}"),
    ] {
        assert_eq!(jwt.verify(&t), Err(Refusal::Invalid), "{t}");
    }
    // Another algorithm with the same secret (HS512): only HS256 is accepted.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims("u1", now_secs() + 600),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    assert_eq!(jwt.verify(&hs512), Err(Refusal::Invalid));
    for junk in ["", "a.b.c", "not a token", "...."] {
        assert_eq!(jwt.verify(junk), Err(Refusal::Invalid), "{junk}");
    }
}

#[tokio::test]
async fn refresh_rotates_and_a_reused_token_revokes_the_family() {
    let records = RecordStore::memory();
    let id = identity(&records);
    let (first, _) = id.register(registration("r@example.com")).await.unwrap();
    let second = id.refresh(&first.refresh_token).await.unwrap();
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_ne!(second.access_token, first.access_token);
    let third = id.refresh(&second.refresh_token).await.unwrap();
    assert!(id.authenticate(&third.access_token).is_ok());

    // The spent `first` comes back: the family is revoked, current tokens included.
    assert!(matches!(
        id.refresh(&first.refresh_token).await,
        Err(Error::InvalidRefreshToken)
    ));
    assert!(matches!(
        id.refresh(&third.refresh_token).await,
        Err(Error::InvalidRefreshToken)
    ));
    for t in [&first, &second, &third] {
        assert_eq!(
            id.authenticate(&t.access_token).unwrap_err(),
            Refusal::Revoked
        );
    }
    // Another login is another family, untouched.
    let other = id
        .login(Login {
            email: "r@example.com".into(),
            password: "correct horse".into(),
        })
        .await
        .unwrap();
    assert!(id.authenticate(&other.access_token).is_ok());
    assert!(id.refresh(&other.refresh_token).await.is_ok());
    assert!(matches!(
        id.refresh("no such token").await,
        Err(Error::InvalidRefreshToken)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_refreshing_one_token_at_once_cannot_both_win() {
    let records = RecordStore::memory();
    let (a, b) = (identity(&records), identity(&records));
    let (tokens, _) = a.register(registration("race@example.com")).await.unwrap();
    for _ in 0..5 {
        let pair = a
            .login(Login {
                email: "race@example.com".into(),
                password: "correct horse".into(),
            })
            .await
            .unwrap();
        let (ra, rb) = tokio::join!(
            a.refresh(&pair.refresh_token),
            b.refresh(&pair.refresh_token)
        );
        assert!(
            !(ra.is_ok() && rb.is_ok()),
            "both refreshes of one token won"
        );
        // The loser saw a spent token: the family is revoked, so nothing of it refreshes.
        for won in [ra, rb].into_iter().flatten() {
            b.sync().await.unwrap();
            assert!(matches!(
                b.refresh(&won.refresh_token).await,
                Err(Error::InvalidRefreshToken)
            ));
            assert_eq!(
                b.authenticate(&won.access_token).unwrap_err(),
                Refusal::Revoked
            );
        }
    }
    assert!(a.authenticate(&tokens.access_token).is_ok());
}

#[tokio::test]
async fn logout_at_one_hub_is_refused_at_the_other_after_one_sync_and_ends_its_streams() {
    let records = RecordStore::memory();
    let (a, b) = (identity(&records), identity(&records));
    b.sync().await.unwrap();
    let (tokens, _) = a.register(registration("l@example.com")).await.unwrap();
    let at_b = b.authenticate(&tokens.access_token).unwrap();
    let stream_end = tokio::spawn(b.revoked(at_b.principal.clone()));
    tokio::task::yield_now().await;
    assert!(!stream_end.is_finished());

    a.logout(&at_b.session.unwrap()).await.unwrap();
    assert_eq!(
        a.authenticate(&tokens.access_token).unwrap_err(),
        Refusal::Revoked
    );
    // B has not looked yet; after one poll it refuses too, and the stream's wait ends.
    assert!(b.authenticate(&tokens.access_token).is_ok());
    b.sync().await.unwrap();
    assert_eq!(
        b.authenticate(&tokens.access_token).unwrap_err(),
        Refusal::Revoked
    );
    tokio::time::timeout(Duration::from_secs(1), stream_end)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        b.refresh(&tokens.refresh_token).await,
        Err(Error::InvalidRefreshToken)
    ));
    // The deny-list record lives as long as the token could have.
    let deny = records.list(REVOKED_JTI).await.unwrap();
    assert_eq!(deny.len(), 2, "the jti and the family");
    assert_eq!(b.inner.denied.len(), 2);
}

#[tokio::test]
async fn managed_keys_carry_their_scopes_and_die_everywhere_when_deleted_or_expired() {
    let records = RecordStore::memory();
    let (a, b) = (identity(&records), identity(&records));
    let created = a
        .create_key(NewKey {
            name: "ci".into(),
            scopes: vec!["tasks".into(), "nodes:read".into(), "tasks".into()],
            expires_at: Some(keys::rfc3339_in(Duration::from_secs(3600))),
            rate_limit: Some(120),
        })
        .await
        .unwrap();
    assert!(
        created
            .key
            .starts_with(&format!("apex_{}_", created.view.id))
    );
    assert_eq!(created.view.scopes, [Scope::Tasks, Scope::NodesRead]);
    let p = a.authenticate(&created.key).unwrap().principal;
    assert_eq!(p.kind, PrincipalKind::Key);
    assert_eq!(p.id, format!("key:{}", created.view.id));
    assert_eq!(p.credential.as_deref(), Some(created.view.id.as_str()));
    assert_eq!(p.rate_limit, Some(120));
    assert!(p.has(Scope::Tasks) && !p.has(Scope::Config));
    // Hub B learns of it at its next poll.
    assert_eq!(b.authenticate(&created.key).unwrap_err(), Refusal::Invalid);
    b.sync().await.unwrap();
    assert!(b.authenticate(&created.key).is_ok());
    // A wrong secret of a known id.
    let mut wrong = created.key.clone();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(wrong.len() - 1.., last);
    assert_eq!(a.authenticate(&wrong).unwrap_err(), Refusal::Invalid);
    // Listed without secrets.
    let listed = serde_json::to_string(&a.list_keys().await.unwrap()).unwrap();
    let secret = created.key.rsplit('_').next().unwrap();
    assert!(listed.contains("\"ci\"") && !listed.contains(secret));
    assert!(!listed.contains("secret"));

    let stream_end = tokio::spawn(b.revoked(p));
    a.delete_key(&created.view.id).await.unwrap();
    assert_eq!(a.authenticate(&created.key).unwrap_err(), Refusal::Invalid);
    b.sync().await.unwrap();
    assert_eq!(b.authenticate(&created.key).unwrap_err(), Refusal::Invalid);
    tokio::time::timeout(Duration::from_secs(1), stream_end)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        a.delete_key(&created.view.id).await,
        Err(Error::KeyNotFound(_))
    ));

    // A key past its expiry (written as an older hub would have) is refused as expired.
    let expiring = a
        .create_key(NewKey {
            name: "short".into(),
            scopes: vec!["chat".into()],
            expires_at: None,
            rate_limit: None,
        })
        .await
        .unwrap();
    let raw = records
        .get(API_KEY, &expiring.view.id)
        .await
        .unwrap()
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    v["expires_at_ms"] = serde_json::json!(now_ms() - 1);
    records
        .put(
            API_KEY,
            &expiring.view.id,
            &serde_json::to_vec(&v).unwrap(),
            None,
        )
        .await
        .unwrap();
    b.sync().await.unwrap();
    assert_eq!(
        b.authenticate(&expiring.key).unwrap_err(),
        Refusal::KeyExpired
    );
}

#[tokio::test]
async fn key_requests_name_the_bad_field() {
    let id = identity(&RecordStore::memory());
    let new = |name: &str, scopes: &[&str], expires_at: Option<&str>, rate_limit| NewKey {
        name: name.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        expires_at: expires_at.map(str::to_owned),
        rate_limit,
    };
    for (k, param) in [
        (new("k", &["tasks", "root"], None, None), "scopes"),
        (new("k", &[], None, None), "scopes"),
        (new("", &["tasks"], None, None), "name"),
        (new("k", &["tasks"], Some("tomorrow"), None), "expires_at"),
        (
            new("k", &["tasks"], Some("2001-01-01T00:00:00Z"), None),
            "expires_at",
        ),
        (new("k", &["tasks"], None, Some(0)), "rate_limit"),
    ] {
        match id.create_key(k).await {
            Err(Error::Invalid { param: p, reason }) => {
                assert_eq!(p, param, "{reason}");
                if p == "scopes" && reason.contains("root") {
                    assert!(reason.contains("nodes:read"), "{reason}");
                }
            }
            other => panic!("{param}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_generated_secret_is_shared_by_every_hub_of_a_store() {
    let records = RecordStore::memory();
    let cfg = AuthConfig::default();
    let a = Identity::open(records.clone(), &cfg).await.unwrap();
    let b = Identity::open(records.clone(), &cfg).await.unwrap();
    let (tokens, _) = a.register(registration("s@example.com")).await.unwrap();
    assert!(b.authenticate(&tokens.access_token).is_ok());
    // Another store, another secret.
    let c = Identity::open(RecordStore::memory(), &cfg).await.unwrap();
    assert_eq!(
        c.authenticate(&tokens.access_token).unwrap_err(),
        Refusal::Invalid
    );
    // A secret variable that is not set stops the hub.
    let named = AuthConfig {
        jwt_secret_env: Some("APEX_TEST_SURELY_UNSET_SECRET_VAR".into()),
        ..AuthConfig::default()
    };
    assert!(matches!(
        Identity::open(records, &named).await,
        Err(Error::Setup(_))
    ));
}

#[test]
fn login_attempts_are_counted_per_email_and_per_address() {
    let addr: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    assert_eq!(
        login_attempt_keys(" Ada@Example.COM ", addr),
        ["login:email:ada@example.com", "login:addr:192.0.2.7"]
    );
}

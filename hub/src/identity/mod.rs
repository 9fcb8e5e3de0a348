//! Identity and access: users and their passwords ([`users`]), access and refresh tokens
//! ([`tokens`]), managed API keys ([`keys`]) and the revocation of all of them
//! ([`revocation`]), behind one cheap-to-clone handle, [`Identity`]. HTTP lives in
//! `http::identity` and `http::keys`; the one authentication step is `http::auth`, which
//! calls [`Identity::authenticate`] for every credential that is not a config key.
//!
//! Everything is kept as records ([`crate::records`]), so one hub and a shared cluster on
//! Redis behave the same:
//!
//! | kind | id | value |
//! | --- | --- | --- |
//! | `user` | user id (UUID) | email, username, argon2id hash, creation time |
//! | `user_email` | lower-cased email | user id (the unique index, written with `create`) |
//! | `refresh_family` | family id | user, sha256 of the current refresh token, revoked flag |
//! | `refresh_token` | sha256 of a refresh token | its family |
//! | `api_key` | key id | name, scopes, expiry, rate limit, sha256 of the secret |
//! | `revoked_jti` | access token `jti` or family id | expiry (TTL: the tokens' lifetime) |
//! | `secret` | `jwt_hs256` | the generated signing secret (create-if-absent) |
//!
//! The per-request check never reaches the store: each hub keeps the revoked ids and the
//! managed keys in memory and reloads them when [`crate::records::RecordStore::version`] of
//! their kind changes (polled every 250 ms by [`spawn_sync`]), so a logout or a deleted key
//! at one hub is refused at every hub within about 250 ms. Long-lived streams wait on
//! [`Identity::revoked`], which resolves once their credential is revoked.
//!
//! No secret (password, hash, token, key) is logged or returned after its one showing.

pub mod keys;
pub mod revocation;
pub mod tokens;
pub mod users;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, watch};

use crate::config::AuthConfig;
use crate::principal::Principal;
use crate::records::{Kind, RecordStore};
use crate::store;

pub use keys::{CreatedKey, KeyView, NewKey};
pub use revocation::spawn_sync;
pub use tokens::{Session, TokenPair};
pub use users::{Login, Profile, Registration, UserView, login_attempt_keys};

/// Users by id.
pub const USER: Kind = "user";
/// The unique email index: lower-cased email → user id.
pub const USER_EMAIL: Kind = "user_email";
/// Refresh-token families (one per login).
pub const REFRESH_FAMILY: Kind = "refresh_family";
/// Refresh tokens by the sha256 of their value → their family.
pub const REFRESH_TOKEN: Kind = "refresh_token";
/// Managed API keys by id.
pub const API_KEY: Kind = "api_key";
/// Revoked access-token ids and revoked families, until their tokens would have expired.
pub const REVOKED_JTI: Kind = "revoked_jti";
/// Generated secrets (`jwt_hs256`).
pub const SECRET: Kind = "secret";

/// The id of the generated signing secret in [`SECRET`].
const JWT_SECRET_ID: &str = "jwt_hs256";

/// Shortest accepted HS256 secret, in bytes.
const MIN_SECRET_BYTES: usize = crate::config::MIN_JWT_SECRET_BYTES;

/// Why an identity operation failed. `http::identity` maps each to its status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request value is malformed (400 naming `param`).
    #[error("{reason}")]
    Invalid {
        /// The parameter at fault (`email`, `password`, `scopes`, ...).
        param: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Registration with an email that has an account (409).
    #[error("an account with this email already exists")]
    EmailTaken,
    /// Login with an unknown email or a wrong password (401, one message for both).
    #[error("wrong email or password")]
    WrongCredentials,
    /// A refresh token that is unknown, expired, already used or of a revoked family (401).
    #[error("invalid, expired or revoked refresh token: log in again")]
    InvalidRefreshToken,
    /// The user of a valid access token no longer exists (401).
    #[error("the user of this token no longer exists")]
    UserGone,
    /// No managed key with this id (404).
    #[error("API key `{0}` not found")]
    KeyNotFound(String),
    /// The record store failed (503).
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Anything else (500; the cause is logged by the HTTP layer, never a secret).
    #[error("{0}")]
    Internal(String),
    /// The hub cannot start identity (the secret variable is missing or too short).
    #[error("{0}")]
    Setup(String),
}

/// Why a bearer credential was refused: every case is a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a config key, managed key or access token this hub signed (bad signature, other
    /// secret, `alg` other than HS256, malformed, unknown key id, wrong key secret).
    Invalid,
    /// An access token past its `exp` (no leeway).
    Expired,
    /// An access token whose `jti` or family was revoked (logout, refresh-token reuse).
    Revoked,
    /// A managed key past its `expires_at`.
    KeyExpired,
}

/// A credential [`Identity::authenticate`] accepted.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The caller.
    pub principal: Principal,
    /// For access tokens: the token's user, `jti`, family and expiry (`/auth/me`, logout).
    pub session: Option<Session>,
}

/// The identity service's handle: users, tokens, keys, revocations. Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    records: RecordStore,
    config: AuthConfig,
    jwt: tokens::Jwt,
    /// The argon2id hash verified against when the email is unknown, computed once.
    dummy_hash: OnceCell<String>,
    denied: revocation::DenyList,
    keys: keys::KeyCache,
    /// Bumped whenever something was revoked (here or, once noticed, at another hub).
    revocations: watch::Sender<u64>,
    /// The record versions the caches were last loaded at (`u64::MAX`: never).
    denied_version: AtomicU64,
    keys_version: AtomicU64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    /// Opens identity on `records`: reads (or creates) the signing secret and loads the
    /// revoked ids and managed keys, so the first request is checked against them.
    ///
    /// # Errors
    /// [`Error::Setup`] when `auth.jwt_secret_env` names a variable that is unset or shorter
    /// than 32 bytes; [`Error::Store`] when the records cannot be read.
    pub async fn open(records: RecordStore, config: &AuthConfig) -> Result<Self, Error> {
        let secret = load_secret(&records, config).await?;
        let me = Self::with_secret(records, config, &secret);
        me.sync().await?;
        Ok(me)
    }

    /// Identity over `records` with a random signing secret that is not stored (tests and
    /// `AppState::new`: tokens die with the process).
    pub fn ephemeral(records: RecordStore, config: &AuthConfig) -> Self {
        Self::with_secret(records, config, random_hex(MIN_SECRET_BYTES).as_bytes())
    }

    fn with_secret(records: RecordStore, config: &AuthConfig, secret: &[u8]) -> Self {
        let (revocations, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                records,
                config: config.clone(),
                jwt: tokens::Jwt::new(secret, config.access_ttl()),
                dummy_hash: OnceCell::new(),
                denied: revocation::DenyList::default(),
                keys: keys::KeyCache::default(),
                revocations,
                denied_version: AtomicU64::new(u64::MAX),
                keys_version: AtomicU64::new(u64::MAX),
            }),
        }
    }

    /// Computes the dummy password hash now rather than at the first login with an unknown
    /// email (`run` calls it before listening).
    ///
    /// # Errors
    /// [`Error::Internal`] if hashing fails.
    pub async fn warm(&self) -> Result<(), Error> {
        self.dummy_hash().await.map(|_| ())
    }

    /// Resolves `Authorization: Bearer <credential>` when it is not a config key: a managed
    /// key (`apex_<id>_<secret>`) or an access token (JWT). In memory only.
    ///
    /// # Errors
    /// The [`Refusal`] (a 401).
    pub fn authenticate(&self, credential: &str) -> Result<Authenticated, Refusal> {
        if let Some(p) = self.key_principal(credential) {
            return p.map(|principal| Authenticated {
                principal,
                session: None,
            });
        }
        let session = self.inner.jwt.verify(credential)?;
        if self.inner.denied.denies(&session.jti) {
            return Err(Refusal::Revoked);
        }
        Ok(Authenticated {
            principal: session.principal(),
            session: Some(session),
        })
    }

    fn records(&self) -> &RecordStore {
        &self.inner.records
    }

    fn config(&self) -> &AuthConfig {
        &self.inner.config
    }
}

/// The signing secret: from the variable `auth.jwt_secret_env` names, else the one in the
/// records (generated and stored with `create` by the first hub, read by the others).
async fn load_secret(records: &RecordStore, config: &AuthConfig) -> Result<Vec<u8>, Error> {
    if let Some(secret) = config.env_secret().map_err(Error::Setup)? {
        return Ok(secret);
    }
    let fresh = random_hex(MIN_SECRET_BYTES);
    let (secret, created) = records
        .generated_secret(SECRET, JWT_SECRET_ID, fresh.as_bytes())
        .await?;
    if created {
        tracing::info!("access-token signing secret generated and stored");
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(Error::Setup(
            "the stored access-token signing secret is unreadable".to_owned(),
        ));
    }
    Ok(secret)
}

/// `n` random bytes (thread-local ChaCha, seeded from the OS) as lowercase hex.
pub(crate) fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The sha256 of `s` as lowercase hex (how refresh tokens and key secrets are stored).
pub(crate) fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    apex_protocol::now_ms()
}

/// Milliseconds as a TTL (at least 1 ms, none for a value in the past).
fn ttl_until(expires_at_ms: i64, now_ms: i64) -> Duration {
    Duration::from_millis(
        u64::try_from(expires_at_ms.saturating_sub(now_ms))
            .unwrap_or(0)
            .max(1),
    )
}

/// Decodes a stored JSON record, naming the kind on failure.
fn decode<T: serde::de::DeserializeOwned>(kind: Kind, id: &str, raw: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(raw)
        .map_err(|e| Error::Internal(format!("stored {kind} record `{id}` is unreadable: {e}")))
}

/// Encodes a record as JSON.
fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(v).map_err(|e| Error::Internal(format!("record not encodable: {e}")))
}

#[cfg(test)]
mod tests;

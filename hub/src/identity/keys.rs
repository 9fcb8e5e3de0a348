//! Managed API keys: created with scopes (and optionally an expiry and a rate limit) by an
//! admin, shown once, listed without their secret, deleted (revoked) at every hub.
//!
//! A key reads `apex_<id>_<secret>`: `<id>` is 16 hex digits (the record id, so lookup is by
//! id) and `<secret>` 64 hex digits, stored only as its sha256 and compared with it in
//! constant time. Keys of the config file (`api_keys`) are not managed keys: they stay admin
//! keys for the life of the process.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::{API_KEY, Error, Identity, Refusal, decode, encode, now_ms, random_hex, sha256_hex};
use crate::model::Rfc3339;
use crate::principal::{Principal, PrincipalKind, Scope};

/// The prefix of every managed key.
pub const KEY_PREFIX: &str = "apex_";

/// Longest key name, in characters.
const MAX_NAME_CHARS: usize = 128;

/// Largest `rate_limit`, in requests a minute.
const MAX_RATE_LIMIT: u32 = 1_000_000;

/// A stored key (never returned as such: see [`KeyView`]).
#[derive(Clone, Serialize, Deserialize)]
struct KeyRecord {
    id: String,
    name: String,
    scopes: Vec<Scope>,
    expires_at_ms: Option<i64>,
    rate_limit: Option<u32>,
    created_at_ms: i64,
    /// sha256 (hex) of the secret part.
    secret_sha256: String,
}

impl KeyRecord {
    fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|e| e <= now_ms)
    }

    fn view(&self) -> KeyView {
        KeyView {
            id: self.id.clone(),
            name: self.name.clone(),
            scopes: self.scopes.clone(),
            expires_at: self.expires_at_ms.map(system_time),
            rate_limit: self.rate_limit,
            created_at: system_time(self.created_at_ms),
        }
    }
}

fn system_time(ms: i64) -> Rfc3339 {
    Rfc3339(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// Body of `POST /v1/keys`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"name": "ci", "scopes": ["tasks"], "expires_at": "2030-01-01T00:00:00Z", "rate_limit": 600}))]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// 1 to 128 characters, for people.
    pub name: String,
    /// Scope names (`admin`, `tasks`, `chat`, `nodes:read`, `nodes:write`, `config`,
    /// `agents`); at least one.
    pub scopes: Vec<String>,
    /// RFC 3339 in UTC (`2030-01-01T00:00:00Z`), in the future; absent: never expires.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Requests a minute this key may make (1 to 1000000); absent: the hub's default.
    #[serde(default)]
    pub rate_limit: Option<u32>,
}

/// A managed key as `GET /v1/keys` shows it: never the secret.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    /// The key id (the `<id>` of `apex_<id>_<secret>`).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Granted scopes, in wire order.
    #[schema(value_type = Vec<String>, example = json!(["tasks", "chat"]))]
    pub scopes: Vec<Scope>,
    /// RFC 3339 expiry, `null` for none.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Rfc3339>,
    /// Requests a minute, `null` for the default.
    pub rate_limit: Option<u32>,
    /// RFC 3339 creation time.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Rfc3339,
}

/// The answer of `POST /v1/keys`: the key's view and, this once, the key itself.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    /// The key's fields.
    #[serde(flatten)]
    pub view: KeyView,
    /// `apex_<id>_<secret>`: shown once, never stored.
    pub key: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("view", &self.view)
            .finish_non_exhaustive()
    }
}

/// The fields of a [`NewKey`] once checked.
struct Checked {
    name: String,
    /// Sorted, without duplicates.
    scopes: Vec<Scope>,
    expires_at_ms: Option<i64>,
    rate_limit: Option<u32>,
}

impl NewKey {
    /// Checks every field.
    fn validate(self, now_ms: i64) -> Result<Checked, Error> {
        let invalid = |param, reason: &str| Error::Invalid {
            param,
            reason: reason.to_owned(),
        };
        let name = self.name.trim().to_owned();
        if name.is_empty()
            || name.chars().count() > MAX_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(invalid(
                "name",
                "`name` must be 1 to 128 characters, without control characters",
            ));
        }
        if self.scopes.is_empty() {
            return Err(invalid("scopes", "`scopes` must name at least one scope"));
        }
        let mut scopes = Vec::with_capacity(self.scopes.len());
        for s in &self.scopes {
            let scope = s.parse::<Scope>().map_err(|e| Error::Invalid {
                param: "scopes",
                reason: format!("`scopes`: {e}"),
            })?;
            scopes.push(scope);
        }
        scopes.sort();
        scopes.dedup();
        let expires_at_ms = match self.expires_at.as_deref() {
            None => None,
            Some(s) => {
                let at = humantime::parse_rfc3339(s.trim()).map_err(|_| {
                    invalid(
                        "expires_at",
                        "`expires_at` must be an RFC 3339 time in UTC, e.g. 2030-01-01T00:00:00Z",
                    )
                })?;
                let ms = crate::model::epoch_ms(at);
                if ms <= now_ms {
                    return Err(invalid("expires_at", "`expires_at` must be in the future"));
                }
                Some(ms)
            }
        };
        if self
            .rate_limit
            .is_some_and(|r| r == 0 || r > MAX_RATE_LIMIT)
        {
            return Err(invalid(
                "rate_limit",
                "`rate_limit` must be 1 to 1000000 requests a minute",
            ));
        }
        Ok(Checked {
            name,
            scopes,
            expires_at_ms,
            rate_limit: self.rate_limit,
        })
    }
}

/// This hub's copy of every managed key, by id, reloaded by `revocation::sync`.
#[derive(Default)]
pub(crate) struct KeyCache {
    keys: RwLock<HashMap<String, Arc<KeyRecord>>>,
    /// Bumped by every change made here, so a reload that read the store before it does not
    /// undo it.
    generation: AtomicU64,
}

impl KeyCache {
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Replaces the cache with the `listed` records unless a change was made here since
    /// `generation` was read; true if it did.
    pub(crate) fn replace(&self, generation: u64, listed: &[(String, Vec<u8>)]) -> bool {
        let mut map = HashMap::with_capacity(listed.len());
        for (id, raw) in listed {
            match serde_json::from_slice::<KeyRecord>(raw) {
                Ok(k) => {
                    map.insert(id.clone(), Arc::new(k));
                }
                Err(e) => {
                    tracing::warn!(key_id = %id, error = %e, "unreadable API key record skipped")
                }
            }
        }
        let mut keys = self.keys.write();
        if self.generation() != generation {
            return false;
        }
        *keys = map;
        true
    }

    fn insert(&self, key: KeyRecord) {
        let mut keys = self.keys.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        keys.insert(key.id.clone(), Arc::new(key));
    }

    fn remove(&self, id: &str) {
        let mut keys = self.keys.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        keys.remove(id);
    }

    fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.keys.read().get(id).cloned()
    }

    /// Whether key `id` exists and has not expired.
    pub(crate) fn holds(&self, id: &str, now_ms: i64) -> bool {
        self.get(id).is_some_and(|k| !k.expired(now_ms))
    }
}

/// `(id, secret)` of a string shaped like a managed key.
fn split_key(credential: &str) -> Option<(&str, &str)> {
    let rest = credential.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

impl Identity {
    /// The principal of a managed key: `None` when `credential` is not shaped like one
    /// (then it may be an access token).
    pub(super) fn key_principal(&self, credential: &str) -> Option<Result<Principal, Refusal>> {
        let (id, secret) = split_key(credential)?;
        let Some(key) = self.inner.keys.get(id) else {
            return Some(Err(Refusal::Invalid));
        };
        let presented = sha256_hex(secret);
        if !bool::from(presented.as_bytes().ct_eq(key.secret_sha256.as_bytes())) {
            return Some(Err(Refusal::Invalid));
        }
        if key.expired(now_ms()) {
            return Some(Err(Refusal::KeyExpired));
        }
        Some(Ok(Principal {
            id: format!("key:{}", key.id),
            kind: PrincipalKind::Key,
            scopes: key.scopes.clone(),
            credential: Some(key.id.clone()),
            rate_limit: key.rate_limit,
        }))
    }

    /// `POST /v1/keys`: a new key, usable at once here and at other hubs within one poll.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `name`, `scopes`, `expires_at` or `rate_limit`;
    /// [`Error::Store`].
    pub async fn create_key(&self, new: NewKey) -> Result<CreatedKey, Error> {
        let now = now_ms();
        let Checked {
            name,
            scopes,
            expires_at_ms,
            rate_limit,
        } = new.validate(now)?;
        let secret = random_hex(32);
        // 64 random bits of id: a clash is all but impossible, and `create` refuses it anyway.
        for _ in 0..3 {
            let id = random_hex(8);
            let record = KeyRecord {
                id: id.clone(),
                name: name.clone(),
                scopes: scopes.clone(),
                expires_at_ms,
                rate_limit,
                created_at_ms: now,
                secret_sha256: sha256_hex(&secret),
            };
            if self
                .records()
                .create(API_KEY, &id, &encode(&record)?, None)
                .await?
            {
                let view = record.view();
                self.inner.keys.insert(record);
                tracing::info!(key_id = %id, name = %view.name, "API key created");
                return Ok(CreatedKey {
                    key: format!("{KEY_PREFIX}{id}_{secret}"),
                    view,
                });
            }
        }
        Err(Error::Internal(
            "no free API key id after 3 tries".to_owned(),
        ))
    }

    /// `GET /v1/keys`: every managed key, newest first (from the store, so keys made at other
    /// hubs are listed at once).
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn list_keys(&self) -> Result<Vec<KeyView>, Error> {
        let mut keys = Vec::new();
        for (id, raw) in self.records().list(API_KEY).await? {
            let k: KeyRecord = decode(API_KEY, &id, &raw)?;
            keys.push(k);
        }
        keys.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(keys.iter().map(KeyRecord::view).collect())
    }

    /// `DELETE /v1/keys/{id}`: the key is refused here at once and at every hub within one
    /// poll; its open streams end.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`]; [`Error::Store`].
    pub async fn delete_key(&self, id: &str) -> Result<(), Error> {
        if !self.records().delete(API_KEY, id).await? {
            return Err(Error::KeyNotFound(id.to_owned()));
        }
        self.inner.keys.remove(id);
        self.notify();
        tracing::info!(key_id = %id, "API key deleted");
        Ok(())
    }
}

/// The RFC 3339 time `from_now` from now (tests' `expires_at`).
#[cfg(test)]
pub(crate) fn rfc3339_in(from_now: Duration) -> String {
    humantime::format_rfc3339(std::time::SystemTime::now() + from_now).to_string()
}

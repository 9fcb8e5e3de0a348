//! Revocation and its propagation: the deny list of access-token ids and families, the
//! in-memory caches every hub keeps of it and of the managed keys, the poll that keeps them
//! current, and the signal long-lived streams wait on.
//!
//! - A revocation is written to the records first ([`super::REVOKED_JTI`], with a TTL of the
//!   longest remaining lifetime of the tokens it denies), then applied to this hub's memory
//!   at once.
//! - Every hub polls [`RecordStore::version`] of [`super::REVOKED_JTI`] and
//!   [`super::API_KEY`] every [`POLL`] ([`spawn_sync`]) and reloads a kind when its version
//!   moved: a logout or key deletion at one hub is in force at every other within one poll
//!   (and a store round trip). Denied ids are only ever added (merged, pruned at expiry);
//!   the key map is replaced, so deletions propagate.
//! - Each change bumps a `watch` counter; [`Identity::revoked`] re-checks its principal's
//!   credential at each bump, so SSE streams end within the same bound.
//! - While the store cannot be read, hubs keep their last copy (and say so once in the log):
//!   revocations made meanwhile at other hubs wait for the store to come back.
//!
//! [`RecordStore::version`]: crate::records::RecordStore::version

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::tokens::family_of;
use super::{API_KEY, Error, Identity, REVOKED_JTI, encode, now_ms, ttl_until};
use crate::principal::{Principal, PrincipalKind};
use crate::store;

/// How often each hub looks for revocations made elsewhere.
pub const POLL: Duration = crate::records::POLL;

/// A deny-list record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Denied {
    /// Until when tokens it names could be valid, Unix ms.
    expires_at_ms: i64,
}

/// Revoked `jti`s and family ids → when they stop mattering (Unix ms).
#[derive(Default)]
pub(crate) struct DenyList {
    ids: RwLock<HashMap<String, i64>>,
}

impl DenyList {
    /// Whether the access token `jti` is denied: itself or its family.
    pub(crate) fn denies(&self, jti: &str) -> bool {
        let ids = self.ids.read();
        ids.contains_key(jti) || family_of(jti).is_some_and(|f| ids.contains_key(f))
    }

    fn insert(&self, id: &str, expires_at_ms: i64) {
        self.ids.write().insert(id.to_owned(), expires_at_ms);
    }

    /// Adds `listed`, drops entries past their expiry; true if an id was new.
    fn merge(&self, listed: Vec<(String, i64)>, now_ms: i64) -> bool {
        let mut ids = self.ids.write();
        ids.retain(|_, exp| *exp > now_ms);
        let mut added = false;
        for (id, exp) in listed {
            if exp > now_ms && ids.insert(id, exp).is_none() {
                added = true;
            }
        }
        added
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.read().len()
    }
}

impl Identity {
    /// Denies `id` (a `jti` or a family id) until `expires_at_ms`, at every hub.
    ///
    /// # Errors
    /// [`Error::Store`]; nothing is denied then (the caller answers an error).
    pub(crate) async fn deny(&self, id: &str, expires_at_ms: i64) -> Result<(), Error> {
        let now = now_ms();
        let value = encode(&Denied { expires_at_ms })?;
        self.records()
            .put(REVOKED_JTI, id, &value, Some(ttl_until(expires_at_ms, now)))
            .await?;
        self.inner.denied.insert(id, expires_at_ms);
        self.notify();
        Ok(())
    }

    /// Tells waiting streams to re-check their credential.
    pub(crate) fn notify(&self) {
        self.inner
            .revocations
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether `principal`'s credential no longer holds: a revoked access token, a deleted or
    /// expired managed key. Config keys (admin) hold for the life of the process.
    pub fn credential_revoked(&self, principal: &Principal) -> bool {
        let Some(credential) = principal.credential.as_deref() else {
            return false;
        };
        match principal.kind {
            PrincipalKind::Admin => false,
            PrincipalKind::User => self.inner.denied.denies(credential),
            PrincipalKind::Key => !self.inner.keys.holds(credential, now_ms()),
        }
    }

    /// Resolves once `principal`'s credential is revoked ([`Identity::credential_revoked`]);
    /// never for config keys. Long-lived responses end when it resolves.
    pub fn revoked(&self, principal: Principal) -> impl Future<Output = ()> + Send + 'static {
        let me = self.clone();
        let mut changes = self.inner.revocations.subscribe();
        async move {
            if principal.kind == PrincipalKind::Admin {
                return std::future::pending().await;
            }
            loop {
                if me.credential_revoked(&principal) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Reloads the deny list and the managed keys if their record versions moved.
    ///
    /// # Errors
    /// [`store::Error`] when the records cannot be read (the caches are left as they were).
    pub(crate) async fn sync(&self) -> Result<(), store::Error> {
        let mut changed = false;
        let v = self.records().version(REVOKED_JTI).await?;
        if v != self.inner.denied_version.load(Ordering::Acquire) {
            let listed = self.records().list(REVOKED_JTI).await?;
            let parsed = listed
                .into_iter()
                .filter_map(|(id, raw)| match serde_json::from_slice::<Denied>(&raw) {
                    Ok(d) => Some((id, d.expires_at_ms)),
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable deny-list record skipped");
                        None
                    }
                })
                .collect();
            changed |= self.inner.denied.merge(parsed, now_ms());
            self.inner.denied_version.store(v, Ordering::Release);
        }
        let v = self.records().version(API_KEY).await?;
        if v != self.inner.keys_version.load(Ordering::Acquire) {
            let generation = self.inner.keys.generation();
            let listed = self.records().list(API_KEY).await?;
            // A key deleted here while the list was read is not put back: then the swap is
            // skipped and the next poll reads again (the version is left unseen).
            if self.inner.keys.replace(generation, &listed) {
                self.inner.keys_version.store(v, Ordering::Release);
                changed = true;
            }
        }
        if changed {
            self.notify();
        }
        Ok(())
    }
}

/// Starts the poll that keeps this hub's deny list and key cache current ([`POLL`]); it
/// stops when `stop` turns true.
pub fn spawn_sync(identity: Identity, stop: watch::Receiver<bool>) -> JoinHandle<()> {
    crate::records::spawn_poll("revocations and API keys", stop, move || {
        let identity = identity.clone();
        async move { identity.sync().await }
    })
}

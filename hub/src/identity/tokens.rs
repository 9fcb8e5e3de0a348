//! Access tokens (JWT, HS256) and refresh tokens (opaque, rotated, in families).
//!
//! **Access tokens** carry `sub` (user id), `jti`, `iat`, `exp` (Unix seconds) and `scope`
//! (space-separated, the `user` role). Only HS256 is accepted (the header's `alg` must be it:
//! `none` and every other algorithm are refused), the signature must verify with this
//! cluster's secret, and `exp` is checked with **no leeway**: a token is refused from the
//! first second after its `exp`. The `jti` is `<family id>.<random>`, so revoking a family
//! revokes every access token issued from it without listing them.
//!
//! **Refresh tokens** are 32 random bytes (hex), stored only as their sha256
//! ([`super::REFRESH_TOKEN`] → family). A login starts a family whose record names its one
//! current token. Each refresh replaces the current token with a new one through
//! `compare_and_set` on the family record, so of two hubs racing with the same token exactly
//! one wins. Presenting a token that is not the current one of its family (already rotated:
//! it was stolen or replayed) or losing that race revokes the whole family: its refresh
//! tokens answer 401, and its access tokens are denied too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{
    Error, Identity, REFRESH_FAMILY, REFRESH_TOKEN, Refusal, decode, encode, now_ms, random_hex,
    sha256_hex,
};
use crate::principal::{Principal, Scope};

/// The `token_type` of every token answer.
pub const TOKEN_TYPE: &str = "bearer";

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    /// The user id.
    pub(crate) sub: String,
    /// `<family id>.<random>`.
    pub(crate) jti: String,
    /// Issued at, Unix seconds.
    pub(crate) iat: u64,
    /// Expires at, Unix seconds.
    pub(crate) exp: u64,
    /// Space-separated scopes.
    pub(crate) scope: String,
}

/// A verified access token, as the request's extension (`/auth/me`, `/auth/logout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The user id (`sub`).
    pub user_id: String,
    /// The token's `jti`.
    pub jti: String,
    /// The refresh family the token was issued from.
    pub family: String,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
    /// The scopes of the `scope` claim that belong to the `user` role.
    pub scopes: Vec<Scope>,
}

impl Session {
    /// The principal of this token: [`Principal::user`], with the token's scopes (a claim
    /// can narrow the `user` role, never widen it).
    pub fn principal(&self) -> Principal {
        let mut p = Principal::user(&self.user_id, &self.jti);
        p.scopes.clone_from(&self.scopes);
        p
    }
}

/// The family part of a `jti` (`<family>.<random>`); `None` for another shape.
pub(crate) fn family_of(jti: &str) -> Option<&str> {
    jti.split_once('.').map(|(f, _)| f)
}

/// The body of a login, registration or refresh answer:
/// `{access_token, refresh_token, token_type: "bearer", expires_in}` (`expires_in` in
/// seconds, the access token's lifetime).
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    /// The JWT for `Authorization: Bearer`.
    pub access_token: String,
    /// The opaque refresh token for `POST /api/v1/auth/refresh` (used once).
    pub refresh_token: String,
    /// Always `bearer`.
    #[schema(value_type = String, example = "bearer")]
    pub token_type: &'static str,
    /// Seconds the access token lives.
    pub expires_in: u64,
}

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPair")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Signs and verifies access tokens with one HS256 secret.
pub(crate) struct Jwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl Jwt {
    /// A signer/verifier for `secret`, issuing tokens that live `ttl`.
    pub(crate) fn new(secret: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// A token for `user_id` from `family`, issued at `now` (Unix seconds): the JWT and its
    /// claims.
    pub(crate) fn issue(
        &self,
        user_id: &str,
        family: &str,
        now: u64,
    ) -> Result<(String, Claims), Error> {
        let claims = Claims {
            sub: user_id.to_owned(),
            jti: format!("{family}.{}", random_hex(12)),
            iat: now,
            exp: now.saturating_add(self.ttl.as_secs()),
            scope: Scope::USER_ROLE
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Internal(format!("access token not signed: {e}")))?;
        Ok((token, claims))
    }

    /// Verifies a token: HS256 only, this secret, not expired (no leeway), a `jti` with a
    /// family. Says nothing of revocation.
    ///
    /// # Errors
    /// [`Refusal::Expired`] past `exp`, else [`Refusal::Invalid`].
    pub(crate) fn verify(&self, token: &str) -> Result<Session, Refusal> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Refusal::Expired,
                _ => Refusal::Invalid,
            })?;
        let c = data.claims;
        let family = family_of(&c.jti).ok_or(Refusal::Invalid)?.to_owned();
        let scopes = c
            .scope
            .split_whitespace()
            .filter_map(|s| s.parse::<Scope>().ok())
            .filter(|s| Scope::USER_ROLE.contains(s))
            .collect();
        Ok(Session {
            user_id: c.sub,
            jti: c.jti,
            family,
            expires_at: c.exp,
            scopes,
        })
    }
}

/// Now, Unix seconds.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A refresh family: who it belongs to and which token is current.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Family {
    user_id: String,
    /// sha256 (hex) of the one refresh token that may be used next.
    current: String,
    /// Set on logout or reuse; final.
    revoked: bool,
    created_at_ms: i64,
    /// How many times it was rotated.
    rotations: u64,
}

/// A refresh token's record: its family.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    family: String,
}

impl Identity {
    /// Starts a session for `user_id` (login, registration): a new family, its first
    /// refresh token and an access token.
    ///
    /// # Errors
    /// [`Error::Store`] when the records cannot be written.
    pub(crate) async fn start_session(&self, user_id: &str) -> Result<TokenPair, Error> {
        let family = uuid::Uuid::new_v4().simple().to_string();
        let refresh = random_hex(32);
        let hash = sha256_hex(&refresh);
        let ttl = Some(self.config().refresh_ttl());
        let link = encode(&TokenRecord {
            family: family.clone(),
        })?;
        self.records().put(REFRESH_TOKEN, &hash, &link, ttl).await?;
        let record = encode(&Family {
            user_id: user_id.to_owned(),
            current: hash,
            revoked: false,
            created_at_ms: now_ms(),
            rotations: 0,
        })?;
        self.records()
            .put(REFRESH_FAMILY, &family, &record, ttl)
            .await?;
        self.pair(user_id, &family, refresh)
    }

    fn pair(&self, user_id: &str, family: &str, refresh: String) -> Result<TokenPair, Error> {
        let (access_token, _) = self.inner.jwt.issue(user_id, family, now_secs())?;
        Ok(TokenPair {
            access_token,
            refresh_token: refresh,
            token_type: TOKEN_TYPE,
            expires_in: self.config().access_token_ttl_secs,
        })
    }

    /// `POST /api/v1/auth/refresh`: trades the current refresh token of a family for a new
    /// one (the old one is spent) and a new access token. A spent token, or one that loses a
    /// race with another refresh of the same token, revokes the family.
    ///
    /// # Errors
    /// [`Error::InvalidRefreshToken`] for an unknown, expired, spent or revoked token;
    /// [`Error::Store`].
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, Error> {
        let hash = sha256_hex(refresh_token.trim());
        let Some(link) = self.records().get(REFRESH_TOKEN, &hash).await? else {
            return Err(Error::InvalidRefreshToken);
        };
        let link: TokenRecord = decode(REFRESH_TOKEN, "<token>", &link)?;
        let Some(raw) = self.records().get(REFRESH_FAMILY, &link.family).await? else {
            return Err(Error::InvalidRefreshToken);
        };
        let family: Family = decode(REFRESH_FAMILY, &link.family, &raw)?;
        if family.revoked {
            return Err(Error::InvalidRefreshToken);
        }
        if family.current != hash {
            tracing::warn!(
                user_id = %family.user_id,
                "refresh token reused: its family is revoked"
            );
            self.revoke_family(&link.family).await?;
            return Err(Error::InvalidRefreshToken);
        }
        let next = random_hex(32);
        let next_hash = sha256_hex(&next);
        let ttl = Some(self.config().refresh_ttl());
        // The new token's link first: a hub dying between the two writes leaves a link to a
        // token nobody was given, never a current token without its link.
        let link_value = encode(&TokenRecord {
            family: link.family.clone(),
        })?;
        self.records()
            .put(REFRESH_TOKEN, &next_hash, &link_value, ttl)
            .await?;
        let rotated = encode(&Family {
            current: next_hash,
            rotations: family.rotations.saturating_add(1),
            ..family.clone()
        })?;
        let won = self
            .records()
            .compare_and_set(
                REFRESH_FAMILY,
                &link.family,
                Some(&raw),
                Some(&rotated),
                ttl,
            )
            .await?;
        if !won {
            // Another refresh of this same token got there first (or a logout): the token
            // was presented twice.
            tracing::warn!(
                user_id = %family.user_id,
                "refresh token used twice at once: its family is revoked"
            );
            self.revoke_family(&link.family).await?;
            return Err(Error::InvalidRefreshToken);
        }
        self.pair(&family.user_id, &link.family, next)
    }

    /// `POST /api/v1/auth/logout`: revokes the session's family (its refresh token and every
    /// access token issued from it) and the access token's `jti`, at every hub.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn logout(&self, session: &Session) -> Result<(), Error> {
        self.revoke_family(&session.family).await?;
        let expires_ms = i64::try_from(session.expires_at)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000);
        self.deny(&session.jti, expires_ms).await
    }

    /// Marks family `family` revoked (final) and denies its access tokens until the last of
    /// them would have expired.
    async fn revoke_family(&self, family: &str) -> Result<(), Error> {
        let ttl = self.config().refresh_ttl();
        if let Some(raw) = self.records().get(REFRESH_FAMILY, family).await? {
            let mut f: Family = decode(REFRESH_FAMILY, family, &raw)?;
            if !f.revoked {
                f.revoked = true;
                // A plain write: `revoked` is final, and any rotation racing with it compares
                // against the value it read, which this write replaces, so it loses.
                self.records()
                    .put(REFRESH_FAMILY, family, &encode(&f)?, Some(ttl))
                    .await?;
            }
        }
        let access_ttl_ms = i64::try_from(self.config().access_ttl().as_millis()).unwrap_or(0);
        self.deny(
            family,
            now_ms().saturating_add(access_ttl_ms).saturating_add(1000),
        )
        .await
    }
}

//! Users: registration (unique email), login, the profile of `/auth/me`, and passwords.
//!
//! Passwords are hashed with argon2id at the `argon2` crate's default parameters (19 MiB,
//! 2 passes, 1 lane; a PHC string with its own 16-byte salt) on the blocking pool, never on a
//! runtime worker. A login with an unknown email verifies the password against a dummy hash
//! computed once with the same parameters, so it takes about as long as one with a known
//! email and a wrong password, and both answer the same 401.
//!
//! Emails are unique compared lower-cased: the index record [`super::USER_EMAIL`] is created
//! with `create` (if absent), atomically across hubs.

use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{Error, Identity, TokenPair, USER, USER_EMAIL, decode, encode, now_ms};
use crate::model::Rfc3339;

/// Shortest password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password, in bytes (hashing time grows with it).
const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest username, in characters.
const MAX_USERNAME_CHARS: usize = 64;
/// Longest email, in bytes (RFC 5321).
const MAX_EMAIL_BYTES: usize = 254;

/// A stored user. The hash is never serialised anywhere but the store.
#[derive(Clone, Serialize, Deserialize)]
struct UserRecord {
    id: String,
    email: String,
    username: String,
    /// argon2id PHC string.
    password_hash: String,
    created_at_ms: i64,
}

/// Body of `POST /api/v1/auth/register`.
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"email": "ada@example.com", "password": "correct horse", "username": "Ada"}))]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// An email address (unique, compared lower-cased).
    pub email: String,
    /// At least 8 characters.
    pub password: String,
    /// 1 to 64 characters, for display.
    pub username: String,
}

/// Body of `POST /api/v1/auth/login`.
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// The email registered with.
    pub email: String,
    /// The password.
    pub password: String,
}

/// A user as registration answers it: `{id, email, username}`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UserView {
    /// User id (UUID).
    pub id: String,
    /// Email as registered.
    pub email: String,
    /// Display name.
    pub username: String,
}

/// `GET /api/v1/auth/me`: `{id, email, username, created_at}` (RFC 3339).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Profile {
    /// The user's fields.
    #[serde(flatten)]
    pub user: UserView,
    /// When the account was registered.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Rfc3339,
}

impl UserRecord {
    fn view(&self) -> UserView {
        UserView {
            id: self.id.clone(),
            email: self.email.clone(),
            username: self.username.clone(),
        }
    }
}

/// The keys a login limiter counts attempts under: one for the email (lower-cased, trimmed)
/// and one for the client address, `["login:email:<email>", "login:addr:<ip>"]`. A limiter
/// refuses a login when either key is over its budget (10 attempts a minute each).
pub fn login_attempt_keys(email: &str, addr: IpAddr) -> [String; 2] {
    [
        format!("login:email:{}", email.trim().to_lowercase()),
        format!("login:addr:{addr}"),
    ]
}

/// The trimmed email, and its lower-cased index key, if it looks like an address: one `@`,
/// a non-empty local part, a domain with a dot inside, no spaces or control characters.
fn checked_email(email: &str) -> Result<(String, String), Error> {
    let email = email.trim();
    let bad = || Error::Invalid {
        param: "email",
        reason: "`email` must be an email address such as name@example.com".to_owned(),
    };
    if email.is_empty() || email.len() > MAX_EMAIL_BYTES {
        return Err(bad());
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err(bad());
    };
    let domain_ok = !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..");
    if local.is_empty() || local.len() > 64 || !domain_ok {
        return Err(bad());
    }
    Ok((email.to_owned(), email.to_lowercase()))
}

fn check_password(password: &str) -> Result<(), Error> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(Error::Invalid {
            param: "password",
            reason: format!("`password` must be at least {MIN_PASSWORD_CHARS} characters"),
        });
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::Invalid {
            param: "password",
            reason: format!("`password` must be at most {MAX_PASSWORD_BYTES} bytes"),
        });
    }
    Ok(())
}

fn check_username(username: &str) -> Result<String, Error> {
    let u = username.trim();
    if u.is_empty() || u.chars().count() > MAX_USERNAME_CHARS || u.chars().any(char::is_control) {
        return Err(Error::Invalid {
            param: "username",
            reason: format!(
                "`username` must be 1 to {MAX_USERNAME_CHARS} characters, without control \
                 characters"
            ),
        });
    }
    Ok(u.to_owned())
}

/// argon2id of `password` with a fresh 16-byte salt, on the blocking pool.
async fn hash_password(password: String) -> Result<String, Error> {
    tokio::task::spawn_blocking(move || {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        Argon2::default()
            .hash_password_with_salt(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Error::Internal(format!("password not hashed: {e}")))
    })
    .await
    .map_err(|e| Error::Internal(format!("password hashing stopped: {e}")))?
}

/// Whether `password` matches the PHC string `hash`, on the blocking pool.
async fn verify_password(password: String, hash: String) -> Result<bool, Error> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .verify_password(password.as_bytes(), hash.as_str())
            .is_ok()
    })
    .await
    .map_err(|e| Error::Internal(format!("password check stopped: {e}")))
}

impl Identity {
    /// The dummy hash (of a random password nobody knows), computed once.
    pub(super) async fn dummy_hash(&self) -> Result<&str, Error> {
        self.inner
            .dummy_hash
            .get_or_try_init(|| hash_password(super::random_hex(16)))
            .await
            .map(String::as_str)
    }

    /// `POST /api/v1/auth/register`: a new user with a session.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `email`, `password` or `username`; [`Error::EmailTaken`];
    /// [`Error::Store`].
    pub async fn register(&self, reg: Registration) -> Result<(TokenPair, UserView), Error> {
        let (email, index) = checked_email(&reg.email)?;
        check_password(&reg.password)?;
        let username = check_username(&reg.username)?;
        let user = UserRecord {
            id: uuid::Uuid::new_v4().to_string(),
            email,
            username,
            password_hash: hash_password(reg.password).await?,
            created_at_ms: now_ms(),
        };
        // The user first, then the unique index: a lost race (or a failure) leaves no index
        // pointing at nothing, only a user record nobody can reach, removed here.
        self.records()
            .put(USER, &user.id, &encode(&user)?, None)
            .await?;
        if !self
            .records()
            .create(USER_EMAIL, &index, user.id.as_bytes(), None)
            .await?
        {
            let _ = self.records().delete(USER, &user.id).await;
            return Err(Error::EmailTaken);
        }
        tracing::info!(user_id = %user.id, "user registered");
        let tokens = self.start_session(&user.id).await?;
        Ok((tokens, user.view()))
    }

    /// `POST /api/v1/auth/login`: a new session for the right email and password.
    ///
    /// # Errors
    /// [`Error::WrongCredentials`] for an unknown email or a wrong password alike (same time,
    /// same message); [`Error::Store`].
    pub async fn login(&self, login: Login) -> Result<TokenPair, Error> {
        let user = match checked_email(&login.email) {
            Ok((_, index)) => self.user_by_email(&index).await?,
            Err(_) => None,
        };
        let Some(user) = user else {
            let dummy = self.dummy_hash().await?.to_owned();
            let _ = verify_password(login.password, dummy).await?;
            return Err(Error::WrongCredentials);
        };
        if !verify_password(login.password, user.password_hash.clone()).await? {
            return Err(Error::WrongCredentials);
        }
        self.start_session(&user.id).await
    }

    async fn user_by_email(&self, index: &str) -> Result<Option<UserRecord>, Error> {
        let Some(id) = self.records().get(USER_EMAIL, index).await? else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&id).into_owned();
        self.user(&id).await
    }

    async fn user(&self, id: &str) -> Result<Option<UserRecord>, Error> {
        match self.records().get(USER, id).await? {
            Some(raw) => decode(USER, id, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// `GET /api/v1/auth/me`: the profile of user `user_id`.
    ///
    /// # Errors
    /// [`Error::UserGone`] if there is no such user; [`Error::Store`].
    pub async fn profile(&self, user_id: &str) -> Result<Profile, Error> {
        let user = self.user(user_id).await?.ok_or(Error::UserGone)?;
        Ok(Profile {
            user: user.view(),
            created_at: Rfc3339(
                UNIX_EPOCH + Duration::from_millis(u64::try_from(user.created_at_ms).unwrap_or(0)),
            ),
        })
    }
}

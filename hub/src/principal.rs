//! Who is calling: the [`Principal`] that authentication resolves once per request
//! (`http::auth`), and what every later step reads from it: authorization ([`Scope`]),
//! ownership of resources ([`Principal::owner`], [`Principal::sees`]) and rate limits
//! ([`Principal::id`]).
//!
//! Three kinds of caller, from the credential in `Authorization: Bearer <credential>`:
//! - **admin**: a key of the config file (`api_keys`); every scope, sees every resource;
//! - **key**: a managed API key (`POST /v1/keys`), with the scopes it was created with;
//! - **user**: a JWT access token of `/api/v1/auth/*`; the `user` role (`tasks`, `chat`,
//!   `agents`), on their own resources only.
//!
//! Owners are strings stored with each resource: `user:<user id>` or `key:<key id>`; admin
//! callers own what they create as `admin`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A permission a route requires. Spelled on the wire (key scopes, JWT `scope` claim) as
/// [`Scope::as_str`] gives: `admin`, `tasks`, `chat`, `nodes:read`, `nodes:write`, `config`,
/// `agents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// Everything, including managed keys and every owner's resources.
    #[serde(rename = "admin")]
    Admin,
    /// `/api/v1/tasks` and node dispatch of tasks.
    #[serde(rename = "tasks")]
    Tasks,
    /// The LLM gateway (`/v1/chat/completions`, `/v1/models`, `/v1/interrupt`) and
    /// conversations.
    #[serde(rename = "chat")]
    Chat,
    /// Node views and events (`GET /v1/nodes`, `/v1/events`, system status).
    #[serde(rename = "nodes:read")]
    NodesRead,
    /// Node actions (drain, undrain, remove).
    #[serde(rename = "nodes:write")]
    NodesWrite,
    /// `/v1/config` (read, change, reload).
    #[serde(rename = "config")]
    Config,
    /// The agent and research APIs.
    #[serde(rename = "agents")]
    Agents,
}

impl Scope {
    /// Every scope, in wire order.
    pub const ALL: [Scope; 7] = [
        Scope::Admin,
        Scope::Tasks,
        Scope::Chat,
        Scope::NodesRead,
        Scope::NodesWrite,
        Scope::Config,
        Scope::Agents,
    ];

    /// The scopes of the `user` role (JWT users).
    pub const USER_ROLE: [Scope; 3] = [Scope::Tasks, Scope::Chat, Scope::Agents];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Tasks => "tasks",
            Scope::Chat => "chat",
            Scope::NodesRead => "nodes:read",
            Scope::NodesWrite => "nodes:write",
            Scope::Config => "config",
            Scope::Agents => "agents",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of [`Scope::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope `{0}` (known: admin, tasks, chat, nodes:read, nodes:write, config, agents)")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_owned()))
    }
}

/// What kind of credential authenticated the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A key of the config file.
    Admin,
    /// A managed API key.
    Key,
    /// A JWT user.
    User,
}

/// The authenticated caller of one request, put in the request's extensions by
/// `http::auth` before any handler runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable id, also the owner string of what this caller creates and the rate-limit key:
    /// `user:<uuid>`, `key:<key id>`, or `admin` (all config keys are one admin).
    pub id: String,
    /// The kind of credential.
    pub kind: PrincipalKind,
    /// Granted scopes (admin: all).
    pub scopes: Vec<Scope>,
    /// The access token's `jti` (users) or the key id (managed keys): what a revocation
    /// names, so open streams of this credential can be closed.
    pub credential: Option<String>,
    /// A per-credential rate limit in requests a minute (managed keys' `rate_limit`).
    pub rate_limit: Option<u32>,
}

impl Principal {
    /// The admin principal of the config file's keys.
    pub fn admin() -> Self {
        Self {
            id: "admin".to_owned(),
            kind: PrincipalKind::Admin,
            scopes: Scope::ALL.to_vec(),
            credential: None,
            rate_limit: None,
        }
    }

    /// A JWT user with the `user` role.
    pub fn user(user_id: &str, jti: &str) -> Self {
        Self {
            id: format!("user:{user_id}"),
            kind: PrincipalKind::User,
            scopes: Scope::USER_ROLE.to_vec(),
            credential: Some(jti.to_owned()),
            rate_limit: None,
        }
    }

    /// The principal the hub acts as on behalf of `owner` (a stored [`Principal::id`]), for
    /// work it does later in that owner's name (a schedule's fire): `admin` is the admin
    /// principal; `user:<id>` a user with the `user` role; `key:<id>` a managed key with the
    /// `tasks` scope. No credential: nothing of it can be revoked mid-way.
    pub fn acting_for(owner: &str) -> Self {
        if owner == "admin" {
            return Self::admin();
        }
        let (kind, scopes) = if owner.starts_with("user:") {
            (PrincipalKind::User, Scope::USER_ROLE.to_vec())
        } else {
            (PrincipalKind::Key, vec![Scope::Tasks])
        };
        Self {
            id: owner.to_owned(),
            kind,
            scopes,
            credential: None,
            rate_limit: None,
        }
    }

    /// Whether the caller may use routes that need `scope` (`admin` implies every scope).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    /// Whether the caller sees every owner's resources (the `admin` scope).
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    /// The owner string recorded on a resource this caller creates.
    pub fn owner(&self) -> &str {
        &self.id
    }

    /// Whether the caller may see a resource owned by `owner` (`None`: created before owners
    /// were recorded, admin only). Others' resources answer 404, not 403.
    pub fn sees(&self, owner: Option<&str>) -> bool {
        self.is_admin() || owner == Some(self.id.as_str())
    }

    /// The owner to filter listings by: `None` for admins (everything), else their own id.
    pub fn list_filter(&self) -> Option<&str> {
        (!self.is_admin()).then_some(self.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_their_wire_names() {
        for s in Scope::ALL {
            assert_eq!(s.as_str().parse::<Scope>(), Ok(s));
            assert_eq!(
                serde_json::to_value(s).expect("a scope serialises"),
                serde_json::Value::String(s.as_str().into())
            );
        }
        assert!("nodes".parse::<Scope>().is_err());
    }

    #[test]
    fn admins_see_all_and_users_their_own() {
        let admin = Principal::admin();
        let alice = Principal::user("a", "j1");
        assert!(admin.has(Scope::Config) && admin.sees(Some("user:b")) && admin.sees(None));
        assert!(alice.has(Scope::Tasks) && !alice.has(Scope::Config));
        assert!(alice.sees(Some("user:a")));
        assert!(!alice.sees(Some("user:b")) && !alice.sees(None));
        assert_eq!(alice.list_filter(), Some("user:a"));
        assert_eq!(admin.list_filter(), None);
        let acting = Principal::acting_for("user:a");
        assert_eq!(acting.owner(), "user:a");
        assert!(!acting.is_admin() && acting.sees(Some("user:a")));
        assert!(Principal::acting_for("admin").is_admin());
        assert!(!Principal::acting_for("key:k").is_admin());
    }
}

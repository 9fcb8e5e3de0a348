//! Signed plugin callbacks (`POST /plugin-callback/{plugin}/{taskId}`, the Apex Bridge route).
//!
//! Everything is derived from one hub secret (kept in the records, so every hub of a shared
//! store and every restart agree) and needs no per-task state:
//! - the **URL token**, `?token=…`: `hex(HMAC-SHA256(secret, "<label>\x1f<plugin>\x1f<taskId>"))`
//!   with the label `token` (a signature is required too) or `token-only` (the plugin's
//!   manifest says `callback_auth = "token"`: the token alone is enough);
//! - the **signing key** given to the plugin as `APEX_CALLBACK_SECRET`:
//!   `hex(HMAC-SHA256(secret, "sign\x1f<plugin>\x1f<taskId>"))`. The plugin sends
//!   `X-Apex-Timestamp: <Unix seconds>` and
//!   `X-Apex-Signature: sha256=<hex HMAC-SHA256(key = the signing key's ASCII bytes,
//!   message = "<timestamp>.<raw body>")>`; a timestamp more than [`MAX_SKEW_SECS`] away from
//!   the hub's clock is refused (replay).

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far a callback's `X-Apex-Timestamp` may be from the hub's clock, in seconds (5 min).
pub const MAX_SKEW_SECS: i64 = 300;

/// Why a callback is refused (all 401 but [`Refusal::Stale`], which is 401 with its own code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `token` query parameter, or one this hub did not issue for this plugin and task.
    #[error("the callback URL's token is missing or wrong for this plugin and task")]
    BadToken,
    /// The token needs a signature and `X-Apex-Signature`/`X-Apex-Timestamp` are missing.
    #[error("X-Apex-Signature and X-Apex-Timestamp are required")]
    Unsigned,
    /// The signature does not match the body and timestamp.
    #[error("X-Apex-Signature does not match the body")]
    BadSignature,
    /// The timestamp is unreadable or more than 5 minutes off (a replay).
    #[error("X-Apex-Timestamp is unreadable or more than 5 minutes from the hub's clock")]
    Stale,
}

impl Refusal {
    /// The error shape's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadToken => "invalid_callback_token",
            Refusal::Unsigned => "missing_signature",
            Refusal::BadSignature => "invalid_signature",
            Refusal::Stale => "stale_timestamp",
        }
    }
}

/// The headers and query of one callback request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// The URL's `token` query parameter.
    pub token: Option<&'a str>,
    /// `X-Apex-Timestamp`, Unix seconds.
    pub timestamp: Option<&'a str>,
    /// `X-Apex-Signature`, `sha256=<hex>`.
    pub signature: Option<&'a str>,
}

/// Issues and checks callback URLs and signatures.
#[derive(Clone)]
pub struct CallbackSigner {
    secret: Vec<u8>,
    base_url: String,
}

impl std::fmt::Debug for CallbackSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackSigner")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl CallbackSigner {
    /// A signer over `secret` whose URLs start with `base_url` (the hub's public URL, e.g.
    /// `http://hub.local:8080`; a trailing `/` is dropped).
    pub fn new(secret: &[u8], base_url: &str) -> Self {
        Self {
            secret: secret.to_vec(),
            base_url: base_url.trim_end_matches('/').to_owned(),
        }
    }

    fn derive(&self, label: &str, plugin: &str, task_id: &str) -> String {
        // A key of any length is accepted by HMAC.
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.secret) else {
            return String::new();
        };
        mac.update(label.as_bytes());
        mac.update(b"\x1f");
        mac.update(plugin.as_bytes());
        mac.update(b"\x1f");
        mac.update(task_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The callback of task `task_id` of `plugin`, as put in `task_assign.metadata.callback`:
    /// `{"url", "secret"}`. `token_only`: the plugin's manifest allows unsigned callbacks.
    pub fn callback(&self, plugin: &str, task_id: &str, token_only: bool) -> Value {
        let label = if token_only { "token-only" } else { "token" };
        json!({
            "url": format!(
                "{}/plugin-callback/{}/{}?token={}",
                self.base_url,
                encode_segment(plugin),
                encode_segment(task_id),
                self.derive(label, plugin, task_id)
            ),
            "secret": self.derive("sign", plugin, task_id),
        })
    }

    /// Checks a callback for `plugin`/`task_id` with `body` at `now_secs` (Unix seconds).
    ///
    /// # Errors
    /// The [`Refusal`]; every comparison is in constant time.
    pub fn verify(
        &self,
        plugin: &str,
        task_id: &str,
        presented: Presented<'_>,
        body: &[u8],
        now_secs: i64,
    ) -> Result<(), Refusal> {
        use subtle::ConstantTimeEq;
        let token = presented.token.ok_or(Refusal::BadToken)?.as_bytes();
        let signed = self.derive("token", plugin, task_id);
        let token_only = self.derive("token-only", plugin, task_id);
        if bool::from(token.ct_eq(token_only.as_bytes())) {
            return Ok(());
        }
        if !bool::from(token.ct_eq(signed.as_bytes())) {
            return Err(Refusal::BadToken);
        }
        let (Some(ts), Some(sig)) = (presented.timestamp, presented.signature) else {
            return Err(Refusal::Unsigned);
        };
        let at: i64 = ts.trim().parse().map_err(|_| Refusal::Stale)?;
        if (now_secs - at).abs() > MAX_SKEW_SECS {
            return Err(Refusal::Stale);
        }
        let expected = sign(&self.derive("sign", plugin, task_id), ts.trim(), body);
        let given = sig.trim();
        if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            Err(Refusal::BadSignature)
        }
    }
}

/// `sha256=<hex HMAC-SHA256(key, "<timestamp>.<body>")>`: what a plugin puts in
/// `X-Apex-Signature` (`key` is `APEX_CALLBACK_SECRET` as given, its ASCII bytes).
pub fn sign(key: &str, timestamp: &str, body: &[u8]) -> String {
    let Ok(mut mac) = HmacSha256::new_from_slice(key.as_bytes()) else {
        return String::new();
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Percent-encodes a path segment (everything but RFC 3986's unreserved characters).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn token_of(cb: &Value) -> String {
        let url = cb["url"].as_str().unwrap();
        url.split("token=").nth(1).unwrap().to_owned()
    }

    #[test]
    fn a_signed_callback_is_accepted_and_every_forgery_refused() {
        let s = CallbackSigner::new(b"0123456789abcdef0123456789abcdef", "http://h:1/");
        let cb = s.callback("report", "t-1", false);
        assert!(
            cb["url"]
                .as_str()
                .unwrap()
                .starts_with("http://h:1/plugin-callback/report/t-1?token=")
        );
        let token = token_of(&cb);
        let key = cb["secret"].as_str().unwrap();
        let body = br#"{"status":"success","result":1}"#;
        let now = 1_700_000_000;
        let sig = sign(key, "1700000000", body);
        let ok = Presented {
            token: Some(&token),
            timestamp: Some("1700000000"),
            signature: Some(&sig),
        };
        assert_eq!(s.verify("report", "t-1", ok, body, now), Ok(()));
        // Another task's token, a changed body, no signature, an old timestamp.
        assert_eq!(
            s.verify("report", "t-2", ok, body, now),
            Err(Refusal::BadToken)
        );
        assert_eq!(
            s.verify("report", "t-1", ok, b"{}", now),
            Err(Refusal::BadSignature)
        );
        let unsigned = Presented {
            signature: None,
            ..ok
        };
        assert_eq!(
            s.verify("report", "t-1", unsigned, body, now),
            Err(Refusal::Unsigned)
        );
        assert_eq!(
            s.verify("report", "t-1", ok, body, now + MAX_SKEW_SECS + 1),
            Err(Refusal::Stale)
        );
        // Another hub secret issues other tokens.
        let other = CallbackSigner::new(b"another secret of enough length!", "http://h:1");
        assert_eq!(
            other.verify("report", "t-1", ok, body, now),
            Err(Refusal::BadToken)
        );
    }

    #[test]
    fn a_token_only_callback_needs_no_signature() {
        let s = CallbackSigner::new(b"k", "http://h");
        let token = token_of(&s.callback("p", "t", true));
        let bare = Presented {
            token: Some(&token),
            ..Presented::default()
        };
        assert_eq!(s.verify("p", "t", bare, b"{}", 0), Ok(()));
        // The signed kind's token alone is not enough.
        let signed = token_of(&s.callback("p", "t", false));
        let bare = Presented {
            token: Some(&signed),
            ..Presented::default()
        };
        assert_eq!(s.verify("p", "t", bare, b"{}", 0), Err(Refusal::Unsigned));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_segment("ok-1.2_x~"), "ok-1.2_x~");
    }
}

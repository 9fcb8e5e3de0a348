//! The network policy of `http_fetch`: which hosts and addresses a task may reach.
//!
//! Rules (config `http_fetch_allow` / `http_fetch_deny`, flags `--http-fetch-allow` /
//! `--http-fetch-deny`): each entry is a CIDR (`10.0.0.0/8`, `fd00::/8`), one address
//! (`127.0.0.1`, `::1`), a host name (`example.com`) or a domain suffix (`*.example.com`,
//! matching its subdomains only).
//!
//! Decision, for the URL's host and then for every address it resolves to (checked at connect
//! time through the HTTP client's resolver, so a DNS answer cannot swap in a forbidden address
//! after the check), and again at every redirect hop:
//! 1. a `deny` match refuses (deny wins over allow);
//! 2. an `allow` match (of the host name or of the address) permits;
//! 3. otherwise the defaults refuse loopback (`127.0.0.0/8`, `::1`), link-local
//!    (`169.254.0.0/16`, `fe80::/10`, which holds the cloud metadata address
//!    `169.254.169.254`), the AWS IPv6 metadata address `fd00:ec2::254`, and unspecified
//!    addresses (`0.0.0.0`, `::`), and permit the rest.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// One policy entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Net(IpNet),
    Host(String),
    /// `*.suffix`: stored as `.suffix`.
    Suffix(String),
}

impl Rule {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an entry is empty".to_owned());
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Rule::Net(net));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Rule::Net(IpNet::from(ip)));
        }
        let (host, suffix) = match s.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "`{s}` is not a CIDR, an address, a host name or `*.domain`"
            ));
        }
        let host = host.to_ascii_lowercase();
        Ok(if suffix {
            Rule::Suffix(format!(".{host}"))
        } else {
            Rule::Host(host)
        })
    }

    fn matches_host(&self, host: &str) -> bool {
        match self {
            Rule::Host(h) => h == host,
            Rule::Suffix(s) => host.ends_with(s.as_str()),
            Rule::Net(_) => false,
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        matches!(self, Rule::Net(n) if n.contains(&ip))
    }
}

/// The validated policy. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPolicy {
    allow: Arc<Vec<Rule>>,
    deny: Arc<Vec<Rule>>,
}

/// Why a destination is refused (shown in the task's error, code `access_denied`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Denied {}

/// AWS's IPv6 instance metadata address, `fd00:ec2::254`.
const AWS_METADATA_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// Loopback, link-local (with the metadata address), AWS's IPv6 metadata address, unspecified.
fn default_denied(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local (cloud metadata) address"),
        IpAddr::V4(v4) if v4.is_unspecified() => Some("an unspecified address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("an unspecified address"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("a link-local address"),
        IpAddr::V6(v6) if v6 == AWS_METADATA_V6 => Some("the cloud metadata address"),
        _ => None,
    }
}

impl NetPolicy {
    /// The policy of `allow` and `deny` entries.
    ///
    /// # Errors
    /// A one-line reason naming the first entry that is not a CIDR, an address, a host name
    /// or `*.domain`.
    pub fn new(allow: &[String], deny: &[String]) -> Result<Self, String> {
        let parse = |v: &[String]| {
            v.iter()
                .map(|s| Rule::parse(s))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            allow: Arc::new(parse(allow)?),
            deny: Arc::new(parse(deny)?),
        })
    }

    /// Checks a host name (lower-cased) before resolving it: `Ok(true)` if an allow rule names
    /// it (its addresses then skip the defaults), `Ok(false)` if no rule names it.
    ///
    /// # Errors
    /// [`Denied`] if a deny rule names it.
    pub fn check_host(&self, host: &str) -> Result<bool, Denied> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.deny.iter().any(|r| r.matches_host(&host)) {
            return Err(Denied(format!(
                "host `{host}` is denied by http_fetch_deny"
            )));
        }
        Ok(self.allow.iter().any(|r| r.matches_host(&host)))
    }

    /// Checks one address; `host_allowed` is what [`NetPolicy::check_host`] answered for the
    /// name it came from (false for an address given literally).
    ///
    /// # Errors
    /// [`Denied`] for a denied address or one the defaults refuse.
    pub fn check_ip(&self, ip: IpAddr, host_allowed: bool) -> Result<(), Denied> {
        if self.deny.iter().any(|r| r.matches_ip(ip)) {
            return Err(Denied(format!("address {ip} is denied by http_fetch_deny")));
        }
        if host_allowed || self.allow.iter().any(|r| r.matches_ip(ip)) {
            return Ok(());
        }
        match default_denied(ip) {
            Some(what) => Err(Denied(format!(
                "address {ip} is {what}, refused by default; allow it with http_fetch_allow"
            ))),
            None => Ok(()),
        }
    }

    /// Checks a URL's host: a name by [`NetPolicy::check_host`], a literal address by
    /// [`NetPolicy::check_ip`] (the resolver is not asked for literal addresses).
    ///
    /// # Errors
    /// [`Denied`].
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Denied> {
        match url.host() {
            Some(url::Host::Domain(d)) => self.check_host(d).map(|_| ()),
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip), false),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip), false),
            None => Err(Denied("the URL has no host".to_owned())),
        }
    }

    /// Keeps the addresses of `host` that the policy permits.
    ///
    /// # Errors
    /// [`Denied`] (the first reason) when none is left.
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Denied> {
        let allowed = self.check_host(host)?;
        let mut first = None;
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check_ip(a.ip(), allowed) {
                Ok(()) => true,
                Err(e) => {
                    first.get_or_insert(e);
                    false
                }
            })
            .collect();
        match (kept.is_empty(), first) {
            (true, Some(e)) => Err(Denied(format!("`{host}`: {e}"))),
            (true, None) => Err(Denied(format!("`{host}` resolved to no address"))),
            (false, _) => Ok(kept),
        }
    }
}

/// The HTTP client's resolver: resolves with the system resolver, then keeps only permitted
/// addresses, so the connection can only go to one of them.
#[derive(Debug, Clone)]
pub struct PolicyResolver {
    policy: NetPolicy,
}

impl PolicyResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: NetPolicy) -> Self {
        Self { policy }
    }
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // Denied names are refused before any DNS query.
            policy.check_host(&host)?;
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = policy.filter(&host, addrs)?;
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// The [`Denied`] somewhere in an error's source chain, if any.
pub fn denied_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Denied> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(d) = err.downcast_ref::<Denied>() {
            return Some(d);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_refuse_loopback_link_local_and_metadata_only() {
        let p = NetPolicy::default();
        for denied in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(p.check_ip(ip(denied), false).is_err(), "{denied}");
        }
        for ok in [
            "93.184.216.34",
            "10.1.2.3",
            "192.168.1.10",
            "2606:4700::1111",
            "fd00::1",
        ] {
            assert!(p.check_ip(ip(ok), false).is_ok(), "{ok}");
        }
    }

    #[test]
    fn allow_opens_a_default_and_deny_wins() {
        let p = NetPolicy::new(
            &[
                "127.0.0.1/32".into(),
                "localhost".into(),
                "*.corp.example".into(),
            ],
            &[
                "10.0.0.0/8".into(),
                "evil.example".into(),
                "127.0.0.1".into(),
            ],
        )
        .unwrap();
        assert!(
            p.check_ip(ip("10.2.3.4"), true).is_err(),
            "deny CIDR beats allowed host"
        );
        assert!(
            p.check_ip(ip("127.0.0.1"), false).is_err(),
            "deny beats allow"
        );
        assert_eq!(p.check_host("LOCALHOST"), Ok(true));
        assert!(
            p.check_ip(ip("::1"), true).is_ok(),
            "an allowed host's loopback address"
        );
        assert_eq!(p.check_host("a.corp.example"), Ok(true));
        assert_eq!(
            p.check_host("corp.example"),
            Ok(false),
            "a suffix matches subdomains"
        );
        assert!(p.check_host("evil.example").is_err());
        assert_eq!(p.check_host("example.org"), Ok(false));
        let addrs = vec![
            "127.0.0.1:80".parse().unwrap(),
            "93.184.216.34:80".parse().unwrap(),
        ];
        assert_eq!(
            p.filter("example.org", addrs).unwrap(),
            vec!["93.184.216.34:80".parse::<SocketAddr>().unwrap()]
        );
        assert!(
            p.filter("example.org", vec!["127.0.0.2:80".parse().unwrap()])
                .is_err()
        );
    }

    #[test]
    fn literal_addresses_in_urls_are_checked() {
        let p = NetPolicy::default();
        for url in [
            "http://127.0.0.1:8080/",
            "http://[::1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
        ] {
            assert!(p.check_url(&url.parse().unwrap()).is_err(), "{url}");
        }
        assert!(
            p.check_url(&"http://93.184.216.34/".parse().unwrap())
                .is_ok()
        );
    }

    #[test]
    fn bad_entries_are_refused_naming_them() {
        for bad in ["", "10.0.0.0/33", "exa mple.com", "*.", "http://x"] {
            let e = NetPolicy::new(&[bad.to_owned()], &[]).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }
}

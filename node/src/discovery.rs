//! Finding the hub on the local network (`--hub auto`): browse mDNS/DNS-SD for the hub's
//! `_apex._tcp` service, take the first instance resolved and build its node-channel URL
//! from its address, port and `path` TXT record ([`hub_url`], pure).
//!
//! A browse runs on a blocking-pool thread over `mdns-sd`'s own daemon thread, started for the
//! browse and stopped after it: the node browses again before every connection attempt, so a
//! hub that moved (new address, new port) is found again.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use mdns_sd::{ResolvedService, ServiceDaemon, ServiceEvent};

use crate::config::DEFAULT_HUB_PATH;

/// The DNS-SD service type the hub registers (`apex_hub::discovery::SERVICE_TYPE`).
pub const SERVICE_TYPE: &str = "_apex._tcp.local.";

/// Why a browse could not run (not "nothing found": that is `Ok(None)`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mDNS daemon could not start or browse.
    #[error("mdns: {0}")]
    Mdns(#[from] mdns_sd::Error),
    /// The browsing thread panicked or was cancelled.
    #[error("mdns browse thread: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A hub found on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its node-channel URL, e.g. `ws://192.168.1.20:8088/distributed-server`.
    pub url: String,
    /// Its DNS-SD instance name (`<name>._apex._tcp.local.`).
    pub instance: String,
    /// Its `version` TXT record, if any.
    pub version: Option<String>,
    /// Its `proto` TXT record, if any.
    pub proto: Option<String>,
}

/// The node-channel URL of a hub resolved at `addresses` and `port` with TXT `path`: an IPv4
/// address first (routable before loopback), else a global IPv6 one (in brackets); link-local
/// IPv6 addresses need a zone and are not used. A `path` that is missing or not a plain
/// absolute path (`/` and URL-safe characters) gives the node's default path. `None` when no
/// address is usable or the port is 0.
pub fn hub_url(addresses: &[IpAddr], port: u16, path: Option<&str>) -> Option<String> {
    if port == 0 {
        return None;
    }
    let rank = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() => Some(0),
        IpAddr::V4(v4) if v4.is_loopback() => Some(1),
        IpAddr::V6(v6) if !v6.is_loopback() && !v6.is_unspecified() && !is_link_local(v6) => {
            Some(2)
        }
        IpAddr::V6(v6) if v6.is_loopback() => Some(3),
        _ => None,
    };
    let ip = addresses
        .iter()
        .filter_map(|ip| rank(ip).map(|r| (r, *ip)))
        .min_by_key(|(r, ip)| (*r, *ip))?
        .1;
    let path = match path {
        Some(p) if plain_path(p) => p,
        _ => DEFAULT_HUB_PATH,
    };
    Some(match ip {
        IpAddr::V4(v4) => format!("ws://{v4}:{port}{path}"),
        IpAddr::V6(v6) => format!("ws://[{v6}]:{port}{path}"),
    })
}

fn is_link_local(v6: &std::net::Ipv6Addr) -> bool {
    (v6.segments()[0] & 0xffc0) == 0xfe80
}

fn plain_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= 200
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/-._~=".contains(c))
}

/// The [`Found`] of a resolved service, if it has a usable address.
pub fn found(service: &ResolvedService) -> Option<Found> {
    let addresses: Vec<IpAddr> = service
        .get_addresses()
        .iter()
        .map(|a| a.to_ip_addr())
        .collect();
    let url = hub_url(
        &addresses,
        service.get_port(),
        service.get_property_val_str("path"),
    )?;
    Some(Found {
        url,
        instance: service.get_fullname().to_owned(),
        version: service.get_property_val_str("version").map(str::to_owned),
        proto: service.get_property_val_str("proto").map(str::to_owned),
    })
}

/// Browses for [`SERVICE_TYPE`] for at most `timeout` and returns the first hub resolved with
/// a usable address; `Ok(None)` when none answered in time.
///
/// # Errors
/// [`Error`] when mDNS cannot run at all (no multicast-capable interface, sockets refused).
pub async fn find_hub(timeout: Duration) -> Result<Option<Found>, Error> {
    tokio::task::spawn_blocking(move || browse(timeout)).await?
}

fn browse(timeout: Duration) -> Result<Option<Found>, Error> {
    let daemon = ServiceDaemon::new()?;
    let result = daemon.browse(SERVICE_TYPE).map(|events| {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match events.recv_timeout(left) {
                Ok(ServiceEvent::ServiceResolved(service)) => {
                    if let Some(f) = found(&service) {
                        return Some(f);
                    }
                    tracing::debug!(service = %service.get_fullname(), "hub advertised without a usable address");
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    });
    let _ = daemon.stop_browse(SERVICE_TYPE);
    if let Ok(done) = daemon.shutdown() {
        let _ = done.recv_timeout(Duration::from_secs(1));
    }
    Ok(result?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_url_prefers_ipv4_and_takes_the_advertised_path() {
        assert_eq!(
            hub_url(
                &ips(&["fe80::1", "2001:db8::5", "127.0.0.1", "192.168.1.20"]),
                8088,
                Some("/distributed-server")
            )
            .as_deref(),
            Some("ws://192.168.1.20:8088/distributed-server")
        );
        assert_eq!(
            hub_url(
                &ips(&["::1", "127.0.0.1"]),
                9000,
                Some("/abp-distributed-server")
            )
            .as_deref(),
            Some("ws://127.0.0.1:9000/abp-distributed-server")
        );
        assert_eq!(
            hub_url(&ips(&["fe80::1", "2001:db8::5"]), 8088, None).as_deref(),
            Some("ws://[2001:db8::5]:8088/distributed-server")
        );
    }

    #[test]
    fn unusable_records_give_no_url_or_the_default_path() {
        assert_eq!(hub_url(&ips(&["fe80::1"]), 8088, None), None);
        assert_eq!(hub_url(&[], 8088, None), None);
        assert_eq!(hub_url(&ips(&["10.0.0.2"]), 0, None), None);
        for bad in ["", "relative", "/a b", "/x?y=1", "//evil.example/x#"] {
            assert_eq!(
                hub_url(&ips(&["10.0.0.2"]), 1, Some(bad)).as_deref(),
                Some("ws://10.0.0.2:1/distributed-server"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_resolved_service_becomes_a_found_hub() {
        let txt = [
            ("version", "0.1.0"),
            ("path", "/distributed-server"),
            ("proto", "1.0"),
        ];
        let info = mdns_sd::ServiceInfo::new(
            SERVICE_TYPE,
            "nas",
            "nas.local.",
            "192.168.1.20",
            8088,
            &txt[..],
        )
        .unwrap();
        let f = found(&info.as_resolved_service()).unwrap();
        assert_eq!(
            f,
            Found {
                url: "ws://192.168.1.20:8088/distributed-server".into(),
                instance: "nas._apex._tcp.local.".into(),
                version: Some("0.1.0".into()),
                proto: Some("1.0".into()),
            }
        );
    }
}

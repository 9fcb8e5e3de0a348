//! Advertising the hub on the local network over mDNS/DNS-SD (`discovery = true`), so that
//! `apex-node --hub auto` finds it with only its node key.
//!
//! The hub registers one instance of [`SERVICE_TYPE`] on its bound port, with the TXT records
//! of [`txt_records`] (`version`, `path`, `proto`), once the listener is bound; it unregisters
//! (mDNS goodbye packets) when the graceful shutdown begins. mDNS runs on its own thread
//! (`mdns-sd`'s daemon); nothing here blocks the runtime except [`Advertiser::stop`], which
//! waits on a blocking-pool thread. A failure to start mDNS is the caller's warning, never a
//! reason not to serve.

use std::net::SocketAddr;
use std::time::Duration;

use mdns_sd::{ServiceDaemon, ServiceInfo, UnregisterStatus};

/// The DNS-SD service type the hub registers and nodes browse.
pub const SERVICE_TYPE: &str = "_apex._tcp.local.";

/// How long [`Advertiser::stop`] waits for the goodbye packets to be sent.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Why the advertisement could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mDNS daemon could not start (no usable interface, sockets refused) or refused the
    /// service record.
    #[error("mdns: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// The TXT records of the hub's service: the hub's crate version, the node channel's path and
/// the wire protocol version.
pub fn txt_records(path: &str) -> Vec<(&'static str, String)> {
    vec![
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ("path", path.to_owned()),
        ("proto", apex_protocol::PROTOCOL_VERSION.to_owned()),
    ]
}

/// A label usable as the `.local.` host name of the record: letters, digits and `-` (others
/// become `-`), at most 63 bytes; `apex-hub` when nothing is left.
pub fn host_label(name: &str) -> String {
    let label: String = name
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() {
        "apex-hub".to_owned()
    } else {
        label.to_owned()
    }
}

/// The machine's host name, the default instance name.
pub fn default_name() -> String {
    sysinfo::System::host_name()
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "apex-hub".to_owned())
}

/// The registered service; [`Advertiser::stop`] withdraws it.
pub struct Advertiser {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Advertiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Advertiser")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

/// Registers instance `name` of [`SERVICE_TYPE`] for the listener bound at `addr`: on its
/// address, or on every interface's addresses (kept up to date) when it listens on an
/// unspecified address. Logs one line saying what is advertised.
///
/// # Errors
/// [`Error::Mdns`] when the daemon cannot start or refuses the record.
pub fn advertise(name: &str, addr: SocketAddr) -> Result<Advertiser, Error> {
    let daemon = ServiceDaemon::new()?;
    let host = format!("{}.local.", host_label(&default_name()));
    let txt = txt_records(crate::http::node_channel::NATIVE_PATH);
    let info = if addr.ip().is_unspecified() {
        ServiceInfo::new(SERVICE_TYPE, name, &host, "", addr.port(), &txt[..])?.enable_addr_auto()
    } else {
        ServiceInfo::new(SERVICE_TYPE, name, &host, addr.ip(), addr.port(), &txt[..])?
    };
    let fullname = info.get_fullname().to_owned();
    if let Err(e) = daemon.register(info) {
        let _ = daemon.shutdown();
        return Err(e.into());
    }
    let addresses = if addr.ip().is_unspecified() {
        "every interface".to_owned()
    } else {
        addr.ip().to_string()
    };
    tracing::info!(
        service = %fullname,
        port = addr.port(),
        addresses = %addresses,
        txt = %txt.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
        "advertising the hub on the local network (mDNS)"
    );
    if addr.ip().is_loopback() {
        tracing::warn!(
            "discovery is on but the hub listens on loopback only: only nodes on this machine \
             can reach what is advertised (listen on 0.0.0.0 for companion devices)"
        );
    }
    Ok(Advertiser { daemon, fullname })
}

impl Advertiser {
    /// Unregisters the service (goodbye packets, so browsers drop it at once) and stops the
    /// daemon, waiting at most two seconds.
    pub async fn stop(self) {
        let Advertiser { daemon, fullname } = self;
        let waited = tokio::task::spawn_blocking(move || {
            let status = daemon
                .unregister(&fullname)
                .map_err(|e| e.to_string())
                .and_then(|rx| rx.recv_timeout(STOP_WAIT).map_err(|e| e.to_string()));
            if let Ok(rx) = daemon.shutdown() {
                let _ = rx.recv_timeout(STOP_WAIT);
            }
            (fullname, status)
        })
        .await;
        match waited {
            Ok((fullname, Ok(UnregisterStatus::OK))) => {
                tracing::info!(service = %fullname, "mDNS advertisement withdrawn");
            }
            Ok((fullname, Ok(UnregisterStatus::NotFound))) => {
                tracing::warn!(service = %fullname, "mDNS advertisement was not registered");
            }
            Ok((fullname, Err(e))) => {
                tracing::warn!(service = %fullname, error = %e, "mDNS advertisement not withdrawn");
            }
            Err(e) => tracing::warn!(error = %e, "mDNS advertisement not withdrawn"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_txt_records_name_the_version_the_node_path_and_the_protocol() {
        let txt = txt_records(crate::http::node_channel::NATIVE_PATH);
        assert_eq!(
            txt,
            vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("path", "/distributed-server".to_owned()),
                ("proto", apex_protocol::PROTOCOL_VERSION.to_owned()),
            ]
        );
        // Each TXT string (`key=value`) must fit its one length byte.
        assert!(txt.iter().all(|(k, v)| k.len() + 1 + v.len() <= 255));
        // mdns-sd accepts them as the record's properties, as they are.
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            "my hub",
            "h.local.",
            "127.0.0.1",
            8088,
            &txt[..],
        )
        .unwrap();
        assert_eq!(info.get_fullname(), "my hub._apex._tcp.local.");
        assert_eq!(
            info.get_property_val_str("path"),
            Some("/distributed-server")
        );
        assert_eq!(info.get_property_val_str("proto"), Some("1.0"));
    }

    #[test]
    fn host_labels_are_dns_labels() {
        assert_eq!(host_label("nas"), "nas");
        assert_eq!(host_label("nas.fritz.box"), "nas");
        assert_eq!(host_label("Büro PC_1"), "B-ro-PC-1");
        assert_eq!(host_label("..."), "apex-hub");
        assert_eq!(host_label(&"x".repeat(100)).len(), 63);
    }
}

//! TLS in front of a plain test server: a throwaway certificate authority ([`TestCa`]) whose
//! PEM file a process trusts through `SSL_CERT_FILE`, and [`TlsFront`], which terminates TLS
//! for `localhost` with a certificate of that CA and relays the bytes to a plain TCP address
//! (e.g. the fake LLM upstream), so `https://localhost:PORT` reaches it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};

/// A certificate authority made for one test, with its certificate written as PEM.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pem_path: PathBuf,
}

impl TestCa {
    /// A new CA named `name`; its certificate is written to `<dir>/<name>.pem`.
    ///
    /// # Errors
    /// If the key or certificate cannot be made or written.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("apex test CA {name}"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key)?;
        let pem_path = dir.join(format!("{name}.pem"));
        std::fs::write(&pem_path, cert.pem())
            .with_context(|| format!("writing {}", pem_path.display()))?;
        Ok(Self {
            cert,
            key,
            pem_path,
        })
    }

    /// The CA certificate's PEM file (what `SSL_CERT_FILE` takes).
    pub fn pem_path(&self) -> &Path {
        &self.pem_path
    }

    /// A server certificate for `localhost` signed by this CA, and its private key.
    fn leaf(&self) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let der = PrivatePkcs8KeyDer::from(key.serialize_der());
        Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
    }
}

/// Terminates TLS for `localhost` on a port of its own and relays each connection to
/// `target`. Stops when dropped.
pub struct TlsFront {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsFront {
    /// Listens on `127.0.0.1:0` with a certificate of `ca`, relaying to `target`.
    ///
    /// # Errors
    /// If TLS cannot be set up or the port cannot be bound.
    pub async fn start(ca: &TestCa, target: SocketAddr) -> Result<Self> {
        let (cert, key) = ca.leaf()?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake: nothing to relay.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// `https://localhost:PORT/v1`, a provider `base_url` reaching the target over TLS.
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}/v1", self.addr.port())
    }
}

//! Transport security (SPEC §2): rustls on the `ring` provider, PEM files re-read when they
//! change, and one stream type for plain and TLS connections.
//!
//! - [`ReloadingAcceptor`] serves `[admin.tls]` and `[iso8583.tls]`. Before each handshake it
//!   compares the files' metadata with what it loaded; when they changed (a cert-manager
//!   renewal rewrites the mounted Secret) it builds a new `ServerConfig`, so new connections
//!   get the new certificate while open ones keep theirs. A renewal caught half-written (key
//!   and certificate not matching yet) keeps the previous configuration and is counted as a
//!   failed reload; the next connection tries again.
//! - A handshake runs in the connection's own task, never in the accept loop, with a deadline;
//!   a failure is counted in `switchyard_tls_handshake_failures_total{channel,reason}` and only
//!   closes that socket.
//! - [`client_config`] builds the client side (upstream links, the ATM simulator, test clients)
//!   from a CA file and an optional client certificate; it is read again at every connect.
//!
//! Key material never reaches logs or errors: errors name the file, never its content.

pub mod dev;

use std::fs::Metadata;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::settings::{ClientTlsSettings, ServerTlsSettings};

/// Loading certificates or keys, or building a TLS configuration from them, failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("failed to read {what} from {path}: {reason}")]
    File {
        /// Which file, e.g. "certificate chain".
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// What went wrong (never the file's content).
        reason: String,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("failed to build the TLS configuration from {cert}: {source}")]
    Config {
        /// The certificate file involved.
        cert: PathBuf,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// The client CA file gave no usable trust anchor.
    #[error("failed to use {path} as client CA: {reason}")]
    ClientCa {
        /// The configured path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The name to verify the server's certificate against is not a DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// The process-wide crypto provider: rustls' `ring` backend (the one sqlx and kube bring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider`] as the process default, for clients (reqwest) that look it up.
/// Idempotent; a provider installed earlier stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn file_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate of a PEM file (a chain, or a CA bundle).
pub fn read_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // the parse error of pki-types never quotes key bytes, only the kind of failure
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("private key", path, e))
}

fn read_roots(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(read_certificates(path, what)?);
    if added == 0 {
        return Err(file_error(
            what,
            path,
            "no usable CA certificate in the file",
        ));
    }
    Ok(roots)
}

/// Builds a server configuration from `[admin.tls]` or `[iso8583.tls]`.
pub fn server_config(s: &ServerTlsSettings) -> Result<ServerConfig, TlsError> {
    let certs = read_certificates(&s.cert_file, "certificate chain")?;
    let key = read_private_key(&s.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            cert: s.cert_file.clone(),
            source,
        })?;
    let builder = match &s.client_ca_file {
        Some(ca) => {
            let roots = read_roots(ca, "client CA")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Config {
            cert: s.cert_file.clone(),
            source,
        })
}

/// Builds a client configuration: trust `ca_file`, present `cert`/`key` when given (mTLS).
pub fn client_config(
    ca_file: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let roots = read_roots(ca_file, "CA certificates")?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            cert: ca_file.to_path_buf(),
            source,
        })?
        .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                read_certificates(cert, "client certificate chain")?,
                read_private_key(key)?,
            )
            .map_err(|source| TlsError::Config {
                cert: cert.to_path_buf(),
                source,
            }),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The client side of one TLS channel: a configuration plus the name to verify.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// From a CA file, an optional client identity and an optional fixed server name.
    pub fn new(
        ca_file: &Path,
        identity: Option<(&Path, &Path)>,
        server_name: Option<String>,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            config: Arc::new(client_config(ca_file, identity)?),
            server_name,
        })
    }

    /// From an `[[upstreams]] tls` entry (the files are read now: call it at each connect).
    pub fn from_settings(s: &ClientTlsSettings) -> Result<Self, TlsError> {
        let identity = match (&s.cert_file, &s.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        Self::new(&s.ca_file, identity, s.server_name.clone())
    }

    /// The rustls configuration (for HTTP clients).
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Connects TLS over `tcp` to `addr` (`host:port`), verifying the configured server name
    /// or else the host part of `addr`.
    pub async fn connect(&self, addr: &str, tcp: TcpStream) -> io::Result<NetStream> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => host_of(addr).to_string(),
        };
        let name = ServerName::try_from(name.clone())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, TlsError::ServerName(name)))?;
        let stream = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await?;
        Ok(NetStream::Client(Box::new(stream)))
    }
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What identifies a file version: modification time, size and inode. Kubernetes swaps a
/// Secret volume's `..data` symlink, which changes all three of the resolved file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(Option<(SystemTime, u64, u64)>);

impl FileStamp {
    fn of(path: &Path) -> Self {
        Self(std::fs::metadata(path).ok().map(|m| {
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                inode(&m),
            )
        }))
    }
}

#[cfg(unix)]
fn inode(m: &Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

#[cfg(not(unix))]
fn inode(_: &Metadata) -> u64 {
    0
}

#[derive(Debug)]
struct Loaded {
    stamps: Vec<FileStamp>,
    config: Arc<ServerConfig>,
}

/// A TLS server configuration that follows its files.
#[derive(Debug)]
pub struct ReloadingAcceptor {
    channel: &'static str,
    settings: ServerTlsSettings,
    metrics: Metrics,
    loaded: Mutex<Loaded>,
}

/// Why a server-side handshake failed (also the `reason` label of the metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not complete within `handshake_timeout`.
    Timeout,
    /// The client's certificate was missing or not from the client CA (mTLS), or it refused ours.
    Certificate,
    /// Anything else: not TLS at all, no common version or cipher, a reset.
    Protocol,
}

impl HandshakeFailure {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Certificate => "certificate",
            Self::Protocol => "protocol",
        }
    }

    /// Sorts an error of a handshake (either side).
    pub fn classify(err: &io::Error) -> Self {
        let certificate = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .is_some_and(|e| {
                matches!(
                    e,
                    rustls::Error::NoCertificatesPresented
                        | rustls::Error::InvalidCertificate(_)
                        | rustls::Error::AlertReceived(
                            rustls::AlertDescription::BadCertificate
                                | rustls::AlertDescription::UnknownCA
                                | rustls::AlertDescription::CertificateRequired
                                | rustls::AlertDescription::CertificateUnknown
                        )
                )
            });
        if certificate {
            Self::Certificate
        } else {
            Self::Protocol
        }
    }
}

impl ReloadingAcceptor {
    /// Loads the files once; a switch does not start with unusable TLS files.
    pub fn new(
        channel: &'static str,
        settings: ServerTlsSettings,
        metrics: Metrics,
    ) -> Result<Self, TlsError> {
        let stamps = Self::stamps(&settings);
        let config = Arc::new(server_config(&settings)?);
        Ok(Self {
            channel,
            settings,
            metrics,
            loaded: Mutex::new(Loaded { stamps, config }),
        })
    }

    fn paths(s: &ServerTlsSettings) -> impl Iterator<Item = &PathBuf> {
        [&s.cert_file, &s.key_file]
            .into_iter()
            .chain(s.client_ca_file.as_ref())
    }

    fn stamps(s: &ServerTlsSettings) -> Vec<FileStamp> {
        Self::paths(s).map(|p| FileStamp::of(p)).collect()
    }

    /// The configuration for the next handshake, re-read first if the files changed.
    pub fn current(&self) -> Arc<ServerConfig> {
        let stamps = Self::stamps(&self.settings);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.stamps != stamps {
            // Remember these stamps either way: a broken file is reported once, not at every
            // connection, and the next change is tried again.
            loaded.stamps = stamps;
            match server_config(&self.settings) {
                Ok(config) => {
                    loaded.config = Arc::new(config);
                    self.metrics.tls_reloaded(self.channel, "ok");
                    info!(channel = self.channel, cert = %self.settings.cert_file.display(), "TLS certificate files changed; new connections use them");
                }
                Err(err) => {
                    self.metrics.tls_reloaded(self.channel, "failed");
                    warn!(channel = self.channel, error = %err, "TLS certificate files changed but cannot be used; keeping the previous certificate");
                }
            }
        }
        loaded.config.clone()
    }

    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        self.settings.handshake_timeout
    }

    /// Runs the server handshake on `tcp` within the deadline; a failure is counted and
    /// logged at debug (a port scanner is not news) and the socket is dropped.
    pub async fn accept(&self, tcp: TcpStream) -> Result<NetStream, HandshakeFailure> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
        let remote = tcp.peer_addr().ok();
        let failure =
            match tokio::time::timeout(self.handshake_timeout(), acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => return Ok(NetStream::Server(Box::new(stream))),
                Ok(Err(err)) => {
                    let failure = HandshakeFailure::classify(&err);
                    debug!(channel = self.channel, ?remote, error = %err, "TLS handshake failed");
                    failure
                }
                Err(_) => {
                    debug!(channel = self.channel, ?remote, "TLS handshake timed out");
                    HandshakeFailure::Timeout
                }
            };
        self.metrics
            .tls_handshake_failed(self.channel, failure.as_str());
        Err(failure)
    }
}

/// A TCP connection, plain or TLS (either side).
#[derive(Debug)]
pub enum NetStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, accepted by this process.
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS, connected by this process.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl NetStream {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Self::Plain(_))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Server(s) => s.get_ref().0,
            Self::Client(s) => s.get_ref().0,
        }
    }
}

impl From<TcpStream> for NetStream {
    fn from(s: TcpStream) -> Self {
        Self::Plain(s)
    }
}

impl AsyncRead for NetStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for NetStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

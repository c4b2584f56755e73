//! Throwaway certificates for development and tests (`switchyard-switch dev-certs`): a CA made
//! on the spot, a server certificate for the names given and a client certificate, all made
//! with `rcgen`. Not for production: production certificates come from cert-manager or the
//! bank's PKI.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use zeroize::Zeroizing;

/// Making or writing the certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    /// rcgen refused the parameters (e.g. an unusable name).
    #[error("failed to make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("failed to write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM.
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8); wiped on drop.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A throwaway certificate authority held in memory.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new CA (ECDSA P-256) with `common_name`.
    pub fn new(common_name: &str) -> Result<Self, DevCertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, PEM (what clients and servers trust).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(
        &self,
        common_name: &str,
        names: &[String],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<IssuedCert, DevCertError> {
        // names that parse as IP addresses become IP SANs, the rest DNS SANs
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server_cert(&self, names: &[String]) -> Result<IssuedCert, DevCertError> {
        let cn = names.first().map(String::as_str).unwrap_or("switchyard");
        self.issue(cn, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (mTLS) for `common_name` (a station, an ATM, the operator).
    pub fn client_cert(&self, common_name: &str) -> Result<IssuedCert, DevCertError> {
        self.issue(
            common_name,
            &[common_name.to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// The files [`write_dev_certs`] made.
#[derive(Debug, Clone)]
pub struct DevCertFiles {
    /// `ca.crt`.
    pub ca: PathBuf,
    /// `server.crt`.
    pub server_cert: PathBuf,
    /// `server.key` (mode 0600).
    pub server_key: PathBuf,
    /// `client.crt`.
    pub client_cert: PathBuf,
    /// `client.key` (mode 0600).
    pub client_key: PathBuf,
}

/// Writes a file; `private` ones are readable by their owner only.
pub fn write_file(path: &Path, text: &str, private: bool) -> Result<(), DevCertError> {
    let err = |source| DevCertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)
}

/// Makes a CA, a server certificate for `server_names` and a client certificate for
/// `client_name`, and writes them to `out` (created if missing).
pub fn write_dev_certs(
    out: &Path,
    server_names: &[String],
    client_name: &str,
) -> Result<DevCertFiles, DevCertError> {
    std::fs::create_dir_all(out).map_err(|source| DevCertError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let ca = DevCa::new("Switchyard development CA")?;
    let server = ca.server_cert(server_names)?;
    let client = ca.client_cert(client_name)?;
    let files = DevCertFiles {
        ca: out.join("ca.crt"),
        server_cert: out.join("server.crt"),
        server_key: out.join("server.key"),
        client_cert: out.join("client.crt"),
        client_key: out.join("client.key"),
    };
    write_file(&files.ca, &ca.cert_pem(), false)?;
    write_file(&files.server_cert, &server.cert_pem, false)?;
    write_file(&files.server_key, &server.key_pem, true)?;
    write_file(&files.client_cert, &client.cert_pem, false)?;
    write_file(&files.client_key, &client.key_pem, true)?;
    Ok(files)
}

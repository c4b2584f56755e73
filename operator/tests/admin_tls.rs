//! The operator reaches a BankSwitch's admin API over HTTPS and trusts only the CA in the
//! BankSwitch's TLS Secret (SPEC §2, §7): a real rustls listener on loopback with a throwaway
//! CA, the operator's real HTTP client, and the CA read through the fake Kubernetes API (only
//! from a Secret labelled for the BankSwitch).

#[allow(dead_code)]
mod fake_api;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use fake_api::{FakeApi, JobOutcome};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use switchyard_operator::bank_switch::secrets::SecretAccessError;
use switchyard_operator::crd::BankSwitch;
use switchyard_operator::switch_admin::{
    AdminEndpoint, BearerToken, SwitchAdmin, SwitchAdminError, TokenFormat, install_crypto_provider,
};

const NS: &str = "payments";
const TOKEN: &str = "viewer-token-5d1e";

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and its key, PEM.
    fn server(&self) -> (String, String) {
        let mut params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

/// A stand-in admin API over HTTPS on 127.0.0.1, answering `GET /v1/saf/stats` to the token.
async fn https_switch(ca: &Ca) -> u16 {
    install_crypto_provider();
    let (cert_pem, key_pem) = ca.server();
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let app = Router::new().route(
        "/v1/saf/stats",
        get(|headers: HeaderMap| async move {
            let authorized = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == format!("Bearer {TOKEN}"));
            if authorized {
                (
                    StatusCode::OK,
                    axum::Json(json!({"backlog": 7, "inFlight": 1, "oldestAgeSeconds": 3,
                        "deadLetters": 0, "deliveredTotal": 0, "byDestination": []})),
                )
            } else {
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"detail": "no"})),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                // a client that refuses our certificate ends the handshake: nothing to serve
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    });
    port
}

fn token() -> BearerToken {
    BearerToken::parse(TOKEN, TokenFormat::Bare).expect("token")
}

fn bank_switch(tls: serde_json::Value) -> BankSwitch {
    serde_json::from_value(json!({
        "apiVersion": "switchyard.io/v1alpha1", "kind": "BankSwitch",
        "metadata": {"name": "atm", "namespace": NS},
        "spec": {
            "image": "registry.example/switchyard/switch:0.1.0",
            "keys": {"lmkSecretRef": {"name": "k", "key": "lmk"},
                     "kekSecretRef": {"name": "k", "key": "kek"}},
            "admin": {"tokenSecretRef": {"name": "a", "key": "tokens"}},
            "tls": tls
        }
    }))
    .expect("BankSwitch")
}

fn tls_secret(name: &str, label: &str, ca_pem: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
           "metadata": {"name": name, "namespace": NS,
                        "labels": {"switchyard.io/bankswitch": label}},
           "data": {"tls.crt": "eA==", "tls.key": "eA==", "ca.crt": fake_api::secret_value(ca_pem.as_bytes())}})
}

#[tokio::test]
async fn https_with_the_bankswitch_ca_is_verified_and_any_other_ca_is_refused() {
    let ca = Ca::new();
    let port = https_switch(&ca).await;
    let admin = SwitchAdmin::new(AdminEndpoint::Fixed(format!("https://localhost:{port}")))
        .expect("client");
    let base = admin.base_url(NS, "atm", true);

    let target = admin
        .target_with_ca(base.clone(), Some(ca.pem().as_bytes()), "atm-tls")
        .expect("target");
    let stats = admin
        .saf_stats(&target, &token())
        .await
        .expect("stats over HTTPS");
    assert_eq!(stats.backlog, 7);

    // a certificate from another CA: the handshake fails, the token is never sent
    let other = Ca::new();
    let target = admin
        .target_with_ca(base.clone(), Some(other.pem().as_bytes()), "atm-tls")
        .expect("target");
    let err = admin
        .saf_stats(&target, &token())
        .await
        .expect_err("unknown CA");
    assert!(matches!(err, SwitchAdminError::Request { .. }), "{err:?}");
    assert!(!format!("{err:?}").contains(TOKEN));

    // the system roots are not trusted either: no CA given means plain HTTP only, and an
    // HTTPS client never falls back to plain HTTP
    let plain = admin
        .target_with_ca(
            format!("http://localhost:{port}"),
            Some(ca.pem().as_bytes()),
            "atm-tls",
        )
        .expect("target");
    let err = admin
        .saf_stats(&plain, &token())
        .await
        .expect_err("https only");
    assert!(matches!(err, SwitchAdminError::Request { .. }), "{err:?}");

    // a ca.crt that is not PEM is a clear error, not a client that trusts nothing
    let err = admin
        .target_with_ca(base, Some(b"not a certificate"), "atm-tls")
        .expect_err("bad CA");
    assert!(err.to_string().contains("atm-tls"), "{err}");
}

#[tokio::test]
async fn the_ca_comes_from_the_labelled_tls_secret_only() {
    let ca = Ca::new();
    let port = https_switch(&ca).await;
    let admin = SwitchAdmin::new(AdminEndpoint::Fixed(format!("https://localhost:{port}")))
        .expect("client");
    let fake = FakeApi::new(JobOutcome::Complete, false);
    let client = fake.client();

    // cert-manager's Secret (<name>-tls) with the label its Certificate's secretTemplate sets
    let issued = bank_switch(json!({"issuerRef": {"name": "ca"}}));
    fake.insert(
        &format!("/api/v1/namespaces/{NS}/secrets/atm-tls"),
        tls_secret("atm-tls", "atm", &ca.pem()),
    );
    let target = admin
        .target(&client, NS, "atm", &issued.spec)
        .await
        .expect("target");
    assert_eq!(
        admin
            .saf_stats(&target, &token())
            .await
            .expect("stats")
            .backlog,
        7
    );

    // an existing Secret named by secretName, labelled for another BankSwitch: not read
    let named = bank_switch(json!({"secretName": "shared-tls"}));
    fake.insert(
        &format!("/api/v1/namespaces/{NS}/secrets/shared-tls"),
        tls_secret("shared-tls", "other", &ca.pem()),
    );
    let err = admin
        .target(&client, NS, "atm", &named.spec)
        .await
        .expect_err("unlabelled");
    assert!(
        matches!(
            err,
            SwitchAdminError::ReadSecret(SecretAccessError::NotLabeled { .. })
        ),
        "{err:?}"
    );
    assert!(
        !fake
            .full_reads()
            .contains(&format!("/api/v1/namespaces/{NS}/secrets/shared-tls")),
        "only its metadata was read"
    );

    // no spec.tls: plain HTTP to the cluster Service
    let cluster = SwitchAdmin::new(AdminEndpoint::ClusterService).expect("client");
    let plain = bank_switch(serde_json::Value::Null);
    let target = cluster
        .target(&client, NS, "atm", &plain.spec)
        .await
        .expect("target");
    assert_eq!(target.base, "http://atm-admin.payments.svc:8080");
}

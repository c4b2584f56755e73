//! Provisioning through the admin API, as a bank's terminal management system would do it:
//! a fresh TMK per terminal, delivered to the switch as a TR-31 block under the KEK.

use serde_json::{Value, json};

use crate::crypto::{ClearKey, Kek, TerminalKeys};
use crate::domain::TerminalId;
use crate::store::TerminalKind;

/// Failures talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// Transport.
    #[error("failed to reach the admin API: {0}")]
    Http(#[from] reqwest::Error),
    /// A problem+json answer.
    #[error("admin API answered {status}: {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The problem's detail.
        detail: String,
    },
    /// Terminal-side cryptography.
    #[error("failed to prepare the TMK: {0}")]
    Crypto(String),
}

/// A small admin API client.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Self {
        crate::tls::install_crypto_provider();
        Self {
            base: base.into().trim_end_matches('/').to_string(),
            token: token.into(),
            http: reqwest::Client::new(),
        }
    }

    /// `base` like `https://switchyard-admin:8080`, trusting (and, for mTLS, presenting)
    /// what `tls` holds.
    pub fn with_tls(
        base: impl Into<String>,
        token: impl Into<String>,
        tls: &crate::tls::TlsClient,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls.config()).clone())
            .build()?;
        Ok(Self {
            base: base.into().trim_end_matches('/').to_string(),
            token: token.into(),
            http,
        })
    }

    async fn answer(resp: reqwest::Response) -> Result<Value, AdminClientError> {
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            Err(AdminClientError::Refused {
                status: status.as_u16(),
                detail: body
                    .get("detail")
                    .and_then(Value::as_str)
                    .unwrap_or("no detail")
                    .to_string(),
            })
        }
    }

    /// POST JSON.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, AdminClientError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        Self::answer(resp).await
    }

    /// GET JSON.
    pub async fn get(&self, path: &str) -> Result<Value, AdminClientError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        Self::answer(resp).await
    }

    /// Registers a terminal with a fresh random TMK and returns the terminal's keys.
    pub async fn register_terminal(
        &self,
        kek: &[u8],
        id: &TerminalId,
        group: &str,
    ) -> Result<TerminalKeys, AdminClientError> {
        let keys = TerminalKeys::generate(&mut rand::rng());
        self.register(kek, id, group, TerminalKind::Atm, keys).await
    }

    /// Registers an acquiring switch as a station (SPEC §6) with a fresh random TMK and returns
    /// the keys its processes share.
    pub async fn register_station(
        &self,
        kek: &[u8],
        id: &TerminalId,
        group: &str,
    ) -> Result<TerminalKeys, AdminClientError> {
        let keys = TerminalKeys::generate(&mut rand::rng());
        self.register(kek, id, group, TerminalKind::Station, keys)
            .await
    }

    async fn register(
        &self,
        kek: &[u8],
        id: &TerminalId,
        group: &str,
        kind: TerminalKind,
        keys: TerminalKeys,
    ) -> Result<TerminalKeys, AdminClientError> {
        let kek = ClearKey::new(kek)
            .and_then(Kek::from_key)
            .map_err(|e| AdminClientError::Crypto(e.to_string()))?;
        let (block, kcv) = keys
            .wrap_tmk_under_kek(&kek)
            .map_err(|e| AdminClientError::Crypto(e.to_string()))?;
        let kcv = kcv.to_string();
        self.post(
            "/v1/terminals",
            &json!({"id": id.as_str(), "group": group, "kind": kind.as_str(),
                "tmk": {"keyBlock": block, "kcv": kcv}}),
        )
        .await?;
        Ok(keys)
    }

    /// Registers an acquiring switch as a station (SPEC §6) with a fresh random AES-128 TMK and
    /// returns that TMK in hex, for the acquirer's `[[upstreams]].tmk_file`. The clear TMK is
    /// shared key material: write it only to a protected file or Secret.
    pub async fn provision_station(
        &self,
        kek: &[u8],
        id: &TerminalId,
    ) -> Result<zeroize::Zeroizing<String>, AdminClientError> {
        let mut bytes = zeroize::Zeroizing::new([0u8; 16]);
        rand::fill(&mut bytes[..]);
        let tmk_hex = zeroize::Zeroizing::new(hex::encode(&bytes[..]));
        let tmk =
            ClearKey::from_hex(&tmk_hex).map_err(|e| AdminClientError::Crypto(e.to_string()))?;
        self.register(
            kek,
            id,
            "stations",
            TerminalKind::Station,
            TerminalKeys::new(tmk),
        )
        .await?;
        Ok(tmk_hex)
    }

    /// Opens an account.
    pub async fn create_account(
        &self,
        id: &str,
        currency: &str,
        balance: i64,
        daily_limit: i64,
    ) -> Result<Value, AdminClientError> {
        self.post(
            "/v1/accounts",
            &json!({"id": id, "currency": currency, "balance": balance, "dailyWithdrawalLimit": daily_limit}),
        )
        .await
    }

    /// Issues a card.
    pub async fn create_card(
        &self,
        pan: &str,
        expiry: &str,
        account: &str,
        pin: &str,
    ) -> Result<Value, AdminClientError> {
        self.post(
            "/v1/cards",
            &json!({"pan": pan, "expiry": expiry, "accountId": account, "pin": pin}),
        )
        .await
    }
}

//! A full ATM session, step by step, as the demo and `switchyard-atm session` show it:
//! provision, sign-on, key exchange, balance, withdrawal, reversal, server-initiated rotation.

use std::time::Duration;

use serde_json::json;

use super::provision::AdminClient;
use super::{AtmClient, AtmError, CardInput, expect_code};
use crate::domain::{KeyType, TerminalId};
use crate::iso8583::Packager;
use crate::iso8583::fields;
use crate::tls::TlsClient;

/// What the session needs.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Switch ISO 8583 address.
    pub iso_addr: String,
    /// Admin API client (admin token).
    pub admin: AdminClient,
    /// Clear KEK to deliver the TMK under.
    pub kek: Vec<u8>,
    /// Terminal to register and drive.
    pub terminal: TerminalId,
    /// Card to use (registered by the session if `provision_card`).
    pub card: CardInput,
    /// Account of the card.
    pub account: String,
    /// Whether to create the account and card first.
    pub provision_card: bool,
    /// Wire profile.
    pub packager: &'static Packager,
    /// TLS to the ISO 8583 port (`[iso8583.tls]`), or plain TCP.
    pub tls: Option<TlsClient>,
}

/// Failure of a step.
#[derive(Debug, thiserror::Error)]
#[error("step \"{step}\" failed: {reason}")]
pub struct StepError {
    /// Which step.
    pub step: &'static str,
    /// Why.
    pub reason: String,
}

fn step<E: std::fmt::Display>(name: &'static str) -> impl FnOnce(E) -> StepError {
    move |e| StepError {
        step: name,
        reason: e.to_string(),
    }
}

/// The available balance of field 54 (second entry, minor units), as `5000.00`.
fn balance_of(m: &crate::iso8583::Message) -> String {
    m.get_str(fields::ADDITIONAL_AMOUNTS)
        .and_then(|f| f.get(28..40))
        .and_then(|amount| amount.parse::<i64>().ok())
        .map(|minor| format!("{}.{:02}", minor / 100, minor % 100))
        .unwrap_or_else(|| "?".into())
}

/// Runs the session, calling `say` with a line per step.
pub async fn run(opts: SessionOptions, mut say: impl FnMut(String)) -> Result<(), StepError> {
    let keys = opts
        .admin
        .register_terminal(&opts.kek, &opts.terminal, "demo")
        .await
        .map_err(step("register terminal"))?;
    say(format!(
        "registered terminal {} (TMK delivered as TR-31 under the KEK, KCV checked)",
        opts.terminal
    ));
    if opts.provision_card {
        opts.admin
            .create_account(&opts.account, &opts.card.currency, 500_000, 300_000)
            .await
            .map_err(step("open account"))?;
        opts.admin
            .create_card(
                &opts.card.pan,
                &opts.card.expiry,
                &opts.account,
                &opts.card.pin,
            )
            .await
            .map_err(step("issue card"))?;
        say(format!(
            "opened account {} with 5000.00 and issued card ****{} (PIN kept only as a PVV)",
            opts.account,
            &opts.card.pan[opts.card.pan.len() - 4..]
        ));
    }
    let mut atm = AtmClient::connect_with(
        &opts.iso_addr,
        opts.tls.as_ref(),
        opts.terminal.clone(),
        keys,
        opts.packager,
    )
    .await
    .map_err(step("connect"))?;
    let m = atm.network("001").await.map_err(step("sign-on"))?;
    expect_code(&m, "00").map_err(step("sign-on"))?;
    say("0800/001 sign-on, MACed under K_NM (derived from the TMK, profile v2) → 0810 39=00, its MAC verified".into());
    let m = atm.network("301").await.map_err(step("echo"))?;
    expect_code(&m, "00").map_err(step("echo"))?;
    say("0800/301 echo → 0810 39=00".into());
    for kt in [KeyType::Tpk, KeyType::Tak] {
        let kcv = atm.exchange_key(kt).await.map_err(step("key exchange"))?;
        say(format!(
            "0800/161 {kt} key change → TR-31 block under TMK; 0800/162 confirm KCV {kcv} → ACTIVE"
        ));
    }
    let m = atm.balance(&opts.card).await.map_err(step("balance"))?;
    expect_code(&m, "00").map_err(step("balance"))?;
    say(format!(
        "0200 balance inquiry (PIN block format 4, AES-CMAC) → 0210 39=00, available {}",
        balance_of(&m)
    ));
    let (request, m) = atm
        .withdraw(&opts.card, 150_000)
        .await
        .map_err(step("withdrawal"))?;
    expect_code(&m, "00").map_err(step("withdrawal"))?;
    say(format!(
        "0200 withdrawal 1500.00 → 0210 39=00 auth code {}, available {}",
        m.get_str(fields::AUTH_CODE).unwrap_or("?"),
        balance_of(&m)
    ));
    let m = atm.reverse(&request).await.map_err(step("reversal"))?;
    expect_code(&m, "00").map_err(step("reversal"))?;
    say("0400 reversal of that withdrawal → 0410 39=00 (funds restored once)".into());
    let m = atm.balance(&opts.card).await.map_err(step("balance"))?;
    say(format!(
        "0200 balance inquiry → 0210 39={}, available {}",
        m.get_str(fields::RESPONSE_CODE).unwrap_or("?"),
        balance_of(&m)
    ));
    let path = format!("/v1/terminals/{}/keys/TAK/rotate", opts.terminal);
    let rotated = opts
        .admin
        .post(&path, &json!({}))
        .await
        .map_err(step("server-initiated rotation"))?;
    say(format!(
        "admin API: POST {path} → new TAK PENDING (KCV {}), pushed on the live session",
        rotated["key"]["kcv"].as_str().unwrap_or("?")
    ));
    let kt = atm
        .wait_for_key_push(Duration::from_secs(5))
        .await
        .map_err(step("server-initiated rotation"))?;
    say(format!(
        "switch → 0800/161 {kt}; terminal unwrapped it and answered 0810 39=00 with its KCV"
    ));
    // The activation happens when the switch reads our 0810; give it a moment, then prove the
    // new TAK is in use with a MACed balance inquiry.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = atm
        .balance(&opts.card)
        .await
        .map_err(step("balance after rotation"))?;
    expect_code(&m, "00").map_err(step("balance after rotation"))?;
    say("0200 balance inquiry MACed under the new TAK → 0210 39=00".into());
    let keys = opts
        .admin
        .get(&format!("/v1/terminals/{}/keys", opts.terminal))
        .await
        .map_err(step("list keys"))?;
    if let Some(list) = keys.as_array() {
        for k in list {
            say(format!(
                "  key {} v{} {} KCV {}",
                k["type"].as_str().unwrap_or("?"),
                k["version"],
                k["state"].as_str().unwrap_or("?"),
                k["kcv"].as_str().unwrap_or("?")
            ));
        }
    }
    let m = atm.network("002").await.map_err(step("sign-off"))?;
    expect_code(&m, "00").map_err(step("sign-off"))?;
    say("0800/002 sign-off → 0810 39=00".into());
    Ok(())
}

impl From<AtmError> for StepError {
    fn from(e: AtmError) -> Self {
        StepError {
            step: "atm",
            reason: e.to_string(),
        }
    }
}

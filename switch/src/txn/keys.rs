//! Key lifecycle operations shared by the admin API and the wire: single-terminal rotation,
//! fleet rotations, time-based activation, binding keys stored by older versions to their
//! terminal, and the key gauges read at scrape time.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::SwitchContext;
use super::fleet::push_round;
use super::key_exchange::pending_or_new;
use crate::domain::{KeyOwner, KeyState, KeyType, TerminalId};
use crate::health::ScrapeRefresh;
use crate::metrics::{KeyLabels, TypeLabel};
use crate::store::{
    Activation, KeyId, KeyRecord, KeyTransition, NewAudit, NewKey, NewRotation, RotationId,
    StoreError, TerminalSelector,
};

/// Makes (or re-uses) a PENDING key of `kt` for one terminal and has it pushed by whichever
/// replica holds the terminal's session. Returns the key and whether the terminal is signed on
/// (then its replica pushes it at once: this one right now, another one when notified or at
/// its next push round, within a second); a terminal that is offline gets it at its next
/// sign-on.
pub async fn rotate_terminal(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    kt: KeyType,
    actor: &str,
) -> Result<(KeyRecord, bool), StoreError> {
    let key = pending_or_new(ctx, terminal, kt, actor).await?;
    push_round(ctx).await;
    let signed_on = !ctx
        .store
        .live_sessions(std::slice::from_ref(terminal), Utc::now())
        .await?
        .is_empty();
    Ok((key, signed_on))
}

/// Why a fleet rotation could not start.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The selector matched nothing.
    #[error("no registered terminal matches the selection")]
    NoTerminals,
    /// Key generation failed.
    #[error("failed to generate keys: {0}")]
    Hsm(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Starts a fleet rotation: one PENDING key per selected terminal, stored in one transaction,
/// then pushed by every replica to the terminals it holds, at most `max_concurrent` awaiting
/// their answer at once across the whole fleet (recorded before the keys, so no replica ever
/// pushes them unpaced).
#[allow(clippy::too_many_arguments)]
pub async fn start_fleet_rotation(
    ctx: Arc<SwitchContext>,
    kt: KeyType,
    selector: &TerminalSelector,
    activation: Activation,
    grace: Duration,
    max_concurrent: Option<usize>,
    actor: &str,
) -> Result<(RotationId, usize), RotationError> {
    let terminals = ctx.store.terminals_in(selector).await?;
    if terminals.is_empty() {
        return Err(RotationError::NoTerminals);
    }
    let rotation = NewRotation {
        id: RotationId::generate(),
        key_type: kt,
        activation,
        grace_seconds: grace.as_secs() as i64,
    };
    let mut keys = Vec::with_capacity(terminals.len());
    for terminal in &terminals {
        let (wrapped, kcv) = ctx
            .hsm
            .generate_key(kt, &KeyOwner::Terminal(terminal.clone()))
            .map_err(|e| RotationError::Hsm(e.to_string()))?;
        keys.push(NewKey {
            terminal_id: terminal.clone(),
            key_type: kt,
            state: KeyState::Pending,
            wrapped,
            kcv: kcv.to_string(),
            rotation_id: Some(rotation.id.clone()),
            grace_seconds: grace.as_secs() as i64,
        });
    }
    if let Some(max) = max_concurrent {
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        ctx.store.set_rotation_pacing(&rotation.id, max).await?;
    }
    ctx.store.insert_keys_bulk(&keys, &rotation, actor).await?;
    let count = terminals.len();
    let id = rotation.id.clone();
    info!(rotation = %id, key_type = %kt, terminals = count, "fleet rotation started");
    // the other replicas hear of the new keys from the store (PostgreSQL NOTIFY, or their
    // next push round); this one starts at once
    ctx.fleet.wake_pusher();
    Ok((id, count))
}

/// Activates, at their time, the PENDING keys of rotations with `atTime` activation.
pub async fn activate_due_keys(ctx: &SwitchContext, now: DateTime<Utc>) -> Result<u64, StoreError> {
    let due = ctx.store.due_pending_keys(now, 500).await?;
    let mut activated = 0;
    for key in due {
        match ctx
            .store
            .transition_key(
                &key.id,
                KeyTransition::Activate,
                ctx.settings.keys.grace,
                "switch:scheduled-activation",
                now,
            )
            .await
        {
            Ok(_) => activated += 1,
            Err(StoreError::InvalidTransition { .. }) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(activated)
}

/// Binds every stored key written before keys were bound to their owner (SPEC §4; see
/// `crypto::hsm`) to the terminal its row names: the upgrade path that needs no re-keying. Each
/// row is re-wrapped only if it still holds the block that was read, so a key replaced
/// meanwhile is left alone; a block the HSM cannot open is logged and skipped (it would be
/// refused at use anyway). Returns how many rows were re-wrapped; one audit record says so.
pub async fn bind_stored_keys(ctx: &SwitchContext) -> Result<u64, StoreError> {
    const PAGE: u32 = 500;
    let mut after: Option<KeyId> = None;
    let mut bound = 0u64;
    loop {
        let page = ctx.store.unbound_keys(after.as_ref(), PAGE).await?;
        for key in &page {
            match ctx.hsm.rebind(&key.wrapped) {
                Ok(Some(rebound)) => {
                    if ctx
                        .store
                        .rewrap_key(&key.id, &key.wrapped, &rebound)
                        .await?
                    {
                        bound += 1;
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    warn!(key = %key.id, terminal = %key.terminal_id, error = %err, "stored key cannot be bound to its terminal; left as it is");
                }
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE as usize => after = Some(last.id.clone()),
            _ => break,
        }
    }
    if bound > 0 {
        info!(keys = bound, "stored keys bound to their terminals");
        let audit = NewAudit {
            actor: "system".into(),
            action: "key.bind".into(),
            target: "keys".into(),
            result: "ok".into(),
            detail: serde_json::json!({ "bound": bound }),
        };
        ctx.store.append_audit(&audit).await?;
    }
    Ok(bound)
}

/// Binds the stored keys of older versions ([`bind_stored_keys`], retried until it succeeds),
/// then runs [`activate_due_keys`] every `interval` until `stop`.
pub async fn activation_loop(ctx: Arc<SwitchContext>, interval: Duration, stop: CancellationToken) {
    let mut keys_bound = false;
    loop {
        if !keys_bound {
            match bind_stored_keys(&ctx).await {
                Ok(_) => keys_bound = true,
                Err(err) => {
                    warn!(error = %err, "binding stored keys to their terminals failed; will retry")
                }
            }
        }
        match activate_due_keys(&ctx, Utc::now()).await {
            Ok(0) => {}
            Ok(n) => info!(activated = n, "scheduled key activations applied"),
            Err(err) => warn!(error = %err, "scheduled key activation failed; will retry"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Refreshes `switchyard_keys{type,state}`, `switchyard_key_age_seconds{type}` and the SAF
/// gauges from the store when Prometheus scrapes (a count per scrape is cheap; keeping gauges in sync with every
/// transition across replicas would not be).
pub fn scrape_refresh(ctx: Arc<SwitchContext>) -> ScrapeRefresh {
    Arc::new(move || {
        let ctx = ctx.clone();
        Box::pin(async move {
            if let Ok(saf) = ctx.store.saf_stats(Utc::now()).await {
                ctx.metrics.set_saf(&saf);
            }
            // fleet-wide, from the session registry: every replica reports the same figure
            ctx.fleet.refresh_gauge(&ctx).await;
            let Ok(stats) = ctx.store.key_stats().await else {
                return;
            };
            for kt in [KeyType::Tmk, KeyType::Tpk, KeyType::Tak] {
                for state in KeyState::ALL {
                    let count = stats
                        .counts
                        .iter()
                        .find(|(t, s, _)| *t == kt && *s == state)
                        .map(|(_, _, n)| *n)
                        .unwrap_or(0);
                    ctx.metrics
                        .keys
                        .get_or_create(&KeyLabels {
                            r#type: kt.as_str().into(),
                            state: state.as_str().into(),
                        })
                        .set(count as i64);
                }
                let age = stats
                    .oldest_active
                    .iter()
                    .find(|(t, _)| *t == kt)
                    .map(|(_, at)| (Utc::now() - *at).num_seconds().max(0))
                    .unwrap_or(0);
                ctx.metrics
                    .key_age_seconds
                    .get_or_create(&TypeLabel {
                        r#type: kt.as_str().into(),
                    })
                    .set(age);
            }
        })
    })
}

//! The store's transaction scripts, written once over [`Conn`](super::sql::Conn) and run by
//! either engine: [`CoreStore`] implements [`Database`] by handing each call's script to its
//! engine as a write (one transaction, committed before the answer) or a read.

mod common;
mod keys;
mod ledger;
mod misc;
mod queue;
mod sessions;
mod terminals;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::engine::{CoreStore, Engine, autocommit_script, read_script, write_script};
use super::*;
use crate::domain::{KeyType, TerminalId, WrappedKey};

#[async_trait]
impl<E: Engine> Database for CoreStore<E> {
    fn backend(&self) -> Backend {
        self.engine.backend()
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.engine.migrate().await
    }

    async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        self.engine.migration_status().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.engine.ping().await
    }

    fn pool_stats(&self) -> PoolStats {
        self.engine.pool_stats()
    }

    async fn close(&self) {
        self.engine.close().await
    }

    async fn create_terminal(&self, t: &NewTerminal, actor: &str) -> Result<Terminal, StoreError> {
        let (t, actor) = (t.clone(), actor.to_string());
        write_script!(self, |c| terminals::create(c, &t, &actor).await)
    }

    async fn create_terminals_bulk(
        &self,
        terminals: &[NewTerminal],
        actor: &str,
    ) -> Result<u64, StoreError> {
        let (list, actor) = (terminals.to_vec(), actor.to_string());
        write_script!(self, |c| terminals::create_bulk(c, &list, &actor).await)
    }

    async fn get_terminal(&self, id: &TerminalId) -> Result<Option<Terminal>, StoreError> {
        let id = id.clone();
        read_script!(self, |c| terminals::get(c, &id).await)
    }

    async fn list_terminals(&self, page: Page) -> Result<Vec<Terminal>, StoreError> {
        read_script!(self, |c| terminals::list(c, &page).await)
    }

    async fn terminals_in(&self, sel: &TerminalSelector) -> Result<Vec<TerminalId>, StoreError> {
        let sel = sel.clone();
        read_script!(self, |c| terminals::selected(c, &sel).await)
    }

    async fn insert_key(&self, k: &NewKey, actor: &str) -> Result<KeyRecord, StoreError> {
        let (k, actor) = (k.clone(), actor.to_string());
        write_script!(self, |c| keys::insert(c, &k, &actor).await)
    }

    async fn insert_keys_bulk(
        &self,
        keys: &[NewKey],
        rotation: &NewRotation,
        actor: &str,
    ) -> Result<(), StoreError> {
        let (list, rotation, actor) = (keys.to_vec(), rotation.clone(), actor.to_string());
        write_script!(self, |c| keys::insert_bulk(c, &list, &rotation, &actor)
            .await)
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.clone();
        read_script!(self, |c| common::load_key(c, id.as_str()).await)
    }

    async fn list_keys(&self, terminal: &TerminalId) -> Result<Vec<KeyRecord>, StoreError> {
        let terminal = terminal.clone();
        read_script!(self, |c| keys::list(c, &terminal).await)
    }

    async fn keys_for_use(
        &self,
        terminal: &TerminalId,
        kt: KeyType,
        now: DateTime<Utc>,
    ) -> Result<UsableKeys, StoreError> {
        let terminal = terminal.clone();
        read_script!(self, |c| keys::for_use(c, &terminal, kt, now).await)
    }

    async fn unbound_keys(
        &self,
        after: Option<&KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let after = after.cloned();
        read_script!(self, |c| keys::unbound(c, after.as_ref(), limit).await)
    }

    async fn rewrap_key(
        &self,
        id: &KeyId,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> Result<bool, StoreError> {
        let (id, old, new) = (id.clone(), old.clone(), new.clone());
        autocommit_script!(self, |c| keys::rewrap(c, &id, &old, &new).await)
    }

    async fn transition_key(
        &self,
        id: &KeyId,
        to: KeyTransition,
        grace: Duration,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, StoreError> {
        let (id, actor) = (id.clone(), actor.to_string());
        write_script!(self, |c| keys::transition(c, &id, to, grace, &actor, now)
            .await)
    }

    async fn rotation_totals(
        &self,
        rotation: &RotationId,
    ) -> Result<Option<RotationStatus>, StoreError> {
        let rotation = rotation.clone();
        read_script!(self, |c| keys::rotation_totals(c, &rotation).await)
    }

    async fn expire_previous(
        &self,
        rotation: &RotationId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let (rotation, actor) = (rotation.clone(), actor.to_string());
        write_script!(self, |c| keys::expire_previous(c, &rotation, &actor, now)
            .await)
    }

    async fn key_stats(&self) -> Result<KeyStats, StoreError> {
        read_script!(self, |c| keys::stats(c).await)
    }

    async fn due_pending_keys(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        read_script!(self, |c| keys::due_pending(c, now, limit).await)
    }

    async fn create_account(&self, a: &NewAccount, actor: &str) -> Result<Account, StoreError> {
        let (a, actor) = (a.clone(), actor.to_string());
        write_script!(self, |c| ledger::create_account(c, &a, &actor).await)
    }

    async fn get_account(&self, id: &AccountId) -> Result<Option<Account>, StoreError> {
        let id = id.clone();
        read_script!(self, |c| ledger::get_account(c, &id).await)
    }

    async fn create_card(&self, card: &NewCard, actor: &str) -> Result<Card, StoreError> {
        let (card, actor) = (card.clone(), actor.to_string());
        write_script!(self, |c| ledger::create_card(c, &card, &actor).await)
    }

    async fn get_card(&self, id: &CardId) -> Result<Option<Card>, StoreError> {
        let id = id.clone();
        read_script!(self, |c| ledger::get_card(c, &id).await)
    }

    async fn find_card(&self, pan_token: &str) -> Result<Option<Card>, StoreError> {
        let pan_token = pan_token.to_string();
        read_script!(self, |c| ledger::find_card(c, &pan_token).await)
    }

    async fn reserve_pin_try(
        &self,
        card: &CardId,
        now: DateTime<Utc>,
    ) -> Result<PinReservation, StoreError> {
        let card = card.clone();
        autocommit_script!(self, |c| ledger::reserve_pin_try(c, &card, now).await)
    }

    async fn release_pin_try(&self, card: &CardId) -> Result<(), StoreError> {
        let card = card.clone();
        autocommit_script!(self, |c| ledger::release_pin_try(c, &card).await)
    }

    async fn authorization_view(&self, key: &ViewKey) -> Result<AuthView, StoreError> {
        let key = key.clone();
        if key.reserve_pin_at.is_some() {
            // a write: one statement on PostgreSQL, the writer on SQLite
            autocommit_script!(self, |c| ledger::read_view(c, key).await)
        } else {
            read_script!(self, |c| ledger::read_view(c, key).await)
        }
    }

    async fn reset_pin(&self, card: &CardId, pvv: &str, actor: &str) -> Result<(), StoreError> {
        let (card, pvv, actor) = (card.clone(), pvv.to_string(), actor.to_string());
        write_script!(self, |c| ledger::reset_pin(c, &card, &pvv, &actor).await)
    }

    async fn find_request(&self, id: &RequestIdentity) -> Result<Option<JournalEntry>, StoreError> {
        let id = id.clone();
        read_script!(self, |c| ledger::find_request(c, &id).await)
    }

    async fn authorize(&self, req: &AuthRequest) -> Result<AuthOutcome, StoreError> {
        let req = req.clone();
        // no transaction: the view is one statement, the posting another (atomic on its own)
        autocommit_script!(self, |c| ledger::authorize(c, req).await)
    }

    async fn reverse(&self, req: &ReversalRequest) -> Result<AuthOutcome, StoreError> {
        let req = req.clone();
        write_script!(self, |c| ledger::reverse(c, &req).await)
    }

    async fn reserve_stans(&self, station: &str, count: u32) -> Result<u32, StoreError> {
        let station = station.to_string();
        autocommit_script!(self, |c| misc::reserve_stans(c, &station, count).await)
    }

    async fn link_keys(&self, upstream: &str) -> Result<Option<LinkKeys>, StoreError> {
        let upstream = upstream.to_string();
        read_script!(self, |c| misc::link_keys(c, &upstream).await)
    }

    async fn save_link_keys(&self, upstream: &str, keys: &LinkKeys) -> Result<(), StoreError> {
        let (upstream, keys) = (upstream.to_string(), keys.clone());
        autocommit_script!(self, |c| misc::save_link_keys(c, &upstream, &keys).await)
    }

    async fn accept_sign_on(
        &self,
        terminal: &TerminalId,
        stan: &str,
        transmitted: &str,
        now: DateTime<Utc>,
        prune_before: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let (terminal, stan, transmitted) =
            (terminal.clone(), stan.to_string(), transmitted.to_string());
        write_script!(self, |c| misc::accept_sign_on(
            c,
            &terminal,
            &stan,
            &transmitted,
            now,
            prune_before
        )
        .await)
    }

    async fn append_audit(&self, e: &NewAudit) -> Result<(), StoreError> {
        let e = e.clone();
        if idempotency::current_claim().is_some() {
            // the claim and the audit record commit together
            write_script!(self, |c| misc::append_audit(c, &e).await)
        } else {
            autocommit_script!(self, |c| misc::append_audit(c, &e).await)
        }
    }

    async fn list_audit(
        &self,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        read_script!(self, |c| misc::list_audit(c, since, limit).await)
    }

    async fn idempotency_get(
        &self,
        key_mac: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let key_mac = key_mac.to_string();
        read_script!(self, |c| misc::idempotency_get(c, &key_mac).await)
    }

    async fn idempotency_finish(
        &self,
        claim: &IdempotencyClaim,
        answer: &StoredAnswer,
    ) -> Result<bool, StoreError> {
        let (claim, answer) = (claim.clone(), answer.clone());
        write_script!(self, |c| misc::idempotency_finish(c, &claim, &answer).await)
    }

    async fn purge_idempotency(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        write_script!(self, |c| misc::purge_idempotency(c, before, limit).await)
    }

    async fn saf_enqueue(&self, a: &NewAdvice) -> Result<EnqueueOutcome, StoreError> {
        let a = a.clone();
        write_script!(self, |c| common::insert_advice(c, &a).await)
    }

    async fn saf_lease(
        &self,
        destination: Option<&str>,
        holder: &str,
        lease: Duration,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Advice>, StoreError> {
        let (destination, holder) = (destination.map(str::to_string), holder.to_string());
        write_script!(self, |c| queue::lease(
            c,
            destination.as_deref(),
            &holder,
            lease,
            limit,
            now
        )
        .await)
    }

    async fn saf_complete(
        &self,
        id: AdviceId,
        holder: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let holder = holder.to_string();
        write_script!(self, |c| queue::complete(c, id, &holder, now).await)
    }

    async fn saf_complete_many(
        &self,
        ids: &[AdviceId],
        holder: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<AdviceId>, StoreError> {
        let (ids, holder) = (ids.to_vec(), holder.to_string());
        autocommit_script!(self, |c| queue::complete_many(c, &ids, &holder, now).await)
    }

    async fn saf_fail(
        &self,
        id: AdviceId,
        holder: &str,
        failure: &AdviceFailure,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<FailOutcome, StoreError> {
        let (holder, failure, policy) = (holder.to_string(), failure.clone(), *policy);
        write_script!(self, |c| queue::fail(
            c, id, &holder, &failure, &policy, now
        )
        .await)
    }

    async fn saf_get(&self, id: AdviceId) -> Result<Option<Advice>, StoreError> {
        read_script!(self, |c| queue::get(c, id).await)
    }

    async fn saf_list(&self, filter: &SafFilter, page: Page) -> Result<Vec<Advice>, StoreError> {
        let filter = filter.clone();
        read_script!(self, |c| queue::list(c, &filter, &page).await)
    }

    async fn saf_stats(&self, now: DateTime<Utc>) -> Result<SafStats, StoreError> {
        // a transaction: the figures come from one snapshot
        write_script!(self, |c| queue::stats(c, now).await)
    }

    async fn saf_retry(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError> {
        let actor = actor.to_string();
        write_script!(self, |c| queue::retry(c, id, &actor, now).await)
    }

    async fn saf_cancel(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError> {
        let actor = actor.to_string();
        write_script!(self, |c| queue::cancel(c, id, &actor, now).await)
    }

    async fn saf_requeue_dead_letter(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError> {
        let actor = actor.to_string();
        write_script!(self, |c| queue::requeue_dead_letter(c, id, &actor, now)
            .await)
    }

    async fn register_replica(
        &self,
        replica: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let replica = replica.to_string();
        write_script!(self, |c| sessions::register_replica(
            c, &replica, lease, now
        )
        .await)
    }

    async fn renew_replica(
        &self,
        replica: &str,
        lease: Duration,
        active: &[i64],
        now: DateTime<Utc>,
    ) -> Result<RegistrySweep, StoreError> {
        let (replica, active) = (replica.to_string(), active.to_vec());
        write_script!(self, |c| sessions::renew_replica(
            c, &replica, lease, &active, now
        )
        .await)
    }

    async fn release_replica(&self, replica: &str) -> Result<(), StoreError> {
        let replica = replica.to_string();
        write_script!(self, |c| sessions::release_replica(c, &replica).await)
    }

    async fn record_sign_on(
        &self,
        entry: &SessionEntry,
        now: DateTime<Utc>,
    ) -> Result<Vec<SessionRef>, StoreError> {
        let entry = entry.clone();
        write_script!(self, |c| sessions::record_sign_on(c, &entry, now).await)
    }

    async fn record_session_end(&self, replica: &str, conn_id: i64) -> Result<bool, StoreError> {
        let replica = replica.to_string();
        write_script!(self, |c| sessions::record_session_end(c, &replica, conn_id)
            .await)
    }

    async fn remove_sessions(&self, terminal: &TerminalId) -> Result<Vec<SessionRef>, StoreError> {
        let terminal = terminal.clone();
        write_script!(self, |c| sessions::remove_sessions(c, &terminal).await)
    }

    async fn live_sessions(
        &self,
        terminals: &[TerminalId],
        now: DateTime<Utc>,
    ) -> Result<Vec<LiveSession>, StoreError> {
        let ids: Vec<String> = terminals.iter().map(|t| t.to_string()).collect();
        read_script!(self, |c| sessions::live_sessions(c, &ids, now).await)
    }

    async fn fleet_sessions(&self, now: DateTime<Utc>) -> Result<FleetSessions, StoreError> {
        read_script!(self, |c| sessions::fleet_sessions(c, now).await)
    }

    async fn set_rotation_pacing(
        &self,
        rotation: &RotationId,
        max_concurrent: u32,
    ) -> Result<(), StoreError> {
        let rotation = rotation.clone();
        autocommit_script!(self, |c| sessions::set_rotation_pacing(
            c,
            &rotation,
            max_concurrent
        )
        .await)
    }

    async fn due_pushes(&self, replica: &str, limit: u32) -> Result<Vec<PushDue>, StoreError> {
        let replica = replica.to_string();
        read_script!(self, |c| sessions::due_pushes(c, &replica, limit).await)
    }

    async fn claim_push(
        &self,
        key: &KeyId,
        replica: &str,
        conn_id: i64,
        now: DateTime<Utc>,
        answer_by: DateTime<Utc>,
    ) -> Result<PushClaim, StoreError> {
        let (key, replica) = (key.clone(), replica.to_string());
        write_script!(self, |c| sessions::claim_push(
            c, &key, &replica, conn_id, now, answer_by
        )
        .await)
    }

    async fn push_answered(
        &self,
        replica: &str,
        conn_id: i64,
        terminal: &TerminalId,
        kt: KeyType,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let (replica, terminal) = (replica.to_string(), terminal.clone());
        autocommit_script!(self, |c| sessions::push_answered(
            c, &replica, conn_id, &terminal, kt, now
        )
        .await)
    }
}

//! A per-terminal cache of usable keys, so a financial request does not read the keys table
//! (TAK for its MAC, TPK for its PIN) on every message.
//!
//! # What is cached, and why it is never served past a key's state on one replica
//!
//! An entry holds the key rows [`Database::keys_for_use`] returned for one (terminal, key type)
//! — the ACTIVE and PENDING keys and the EXPIRED ones still in grace when it was read — and the
//! answer for a request at `now` is computed from those rows by [`usable_at`], the same rule
//! the store applies in SQL. Time is therefore never cached: a grace window that ends after the
//! read ends for the cache at the same instant it ends for the store. Only a *state change*
//! could make the rows wrong, and every state change this process makes goes through
//! [`KeyCachingStore`], which wraps the store every part of the switch holds and drops the
//! terminal's entries (or all entries, for the calls that change many terminals) after each
//! key-changing call — `insert_key`, `insert_keys_bulk`, `transition_key` (key exchange,
//! admin activate/expire/revoke, due `atTime` activations), `expire_previous`, `rewrap_key` —
//! whatever its result. A read that raced with such a call cannot put its older rows back: an
//! entry is only stored when no invalidation happened since its read began (a generation
//! counter), so after a change returns, every lookup sees the new state.
//!
//! # With several replicas
//!
//! A change made by another process (another replica's admin API or activation loop, a
//! station's key exchange on another replica's session) reaches this cache through the store:
//! on PostgreSQL a trigger notifies every replica of each key change (`switchyard_keys`), and
//! `txn::fleet` drops the changed terminal's entries at once. Should a notification be lost
//! (the listening connection drops; every entry is dropped when it is re-opened), the change is
//! still seen once the entry's `[keys] cache_ttl` (default 1 s; `0` disables the cache) ends.
//! The effect of that last resort is bounded and one-sided:
//! - a key that became usable elsewhere (a new TAK or TPK activated) is never refused because
//!   of the cache: a MAC or PIN that fails under cached keys is checked again under keys read
//!   from the store before the answer (callers use [`Lookup::cached`] for that);
//! - a key taken out of use elsewhere (revoked, or its grace ended early by `expire_previous`)
//!   may still verify for at most `cache_ttl` — far below the grace window (minutes) during
//!   which such a key is accepted anyway.
//!
//! Key *management* (sign-on TMK checks, key exchange, pushes) keeps reading the store:
//! decisions such as "re-deliver the PENDING key or make one" must see the newest rows.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;

use super::{
    Account, AccountId, Advice, AdviceFailure, AdviceId, AuditRecord, AuthOutcome, AuthRequest,
    AuthView, Backend, Card, CardId, Database, EnqueueOutcome, FailOutcome, FleetSessions,
    IdempotencyClaim, IdempotencyRecord, JournalEntry, KeyId, KeyRecord, KeyStats, KeyTransition,
    LinkKeys, MigrationStatus, NewAccount, NewAdvice, NewAudit, NewCard, NewKey, NewRotation,
    NewTerminal, Page, PinReservation, PoolStats, RequestIdentity, RetryPolicy, ReversalRequest,
    RotationId, RotationStatus, SafFilter, SafStats, Store, StoreError, StoredAnswer, Terminal,
    TerminalSelector, UsableKeys, ViewKey,
};
use super::{LiveSession, PushClaim, PushDue, RegistrySweep, SessionEntry, SessionRef};
use crate::domain::{KeyState, KeyType, TerminalId, WrappedKey};

/// The keys of `rows` a terminal's traffic may be checked against at `now`: the newest ACTIVE
/// key, the newest PENDING key, and the EXPIRED keys whose grace ends after `now`, newest first.
/// The store's `keys_for_use` applies it to the rows its query selects; the cache to every row
/// it holds, so both answer alike.
pub fn usable_at(rows: impl IntoIterator<Item = KeyRecord>, now: DateTime<Utc>) -> UsableKeys {
    let mut rows: Vec<KeyRecord> = rows.into_iter().collect();
    rows.sort_by_key(|k| std::cmp::Reverse(k.version));
    let mut usable = UsableKeys::default();
    for key in rows {
        match key.state {
            KeyState::Active if usable.active.is_none() => usable.active = Some(key),
            KeyState::Pending if usable.pending.is_none() => usable.pending = Some(key),
            KeyState::Expired if key.grace_until.is_some_and(|until| until > now) => {
                usable.in_grace.push(key)
            }
            _ => {}
        }
    }
    usable
}

/// Usable keys, and whether they came from the cache (then a refusal should look again).
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The keys.
    pub keys: UsableKeys,
    /// Served from a cached read rather than read now.
    pub cached: bool,
}

/// One (terminal, key type)'s rows.
#[derive(Debug)]
struct Entry {
    rows: Vec<KeyRecord>,
    /// The `now` they were read for: a lookup for an earlier instant reads again.
    read_for: DateTime<Utc>,
    read_at: Instant,
}

/// The cache of usable keys (see the module documentation).
#[derive(Debug)]
pub struct KeyCache {
    ttl: Duration,
    entries: Mutex<HashMap<(TerminalId, KeyType), Entry>>,
    /// Bumped by every invalidation; a read stores its rows only if it did not move meanwhile.
    generation: AtomicU64,
    hits: Counter,
    misses: Counter,
}

impl KeyCache {
    /// A cache whose entries live `ttl` (zero: every lookup reads the store), counting lookups
    /// in `hits` and `misses`.
    pub fn new(ttl: Duration, hits: Counter, misses: Counter) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            hits,
            misses,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TerminalId, KeyType), Entry>> {
        // nothing in this file panics while holding the lock; recover the map rather than fail
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The keys of `terminal` usable at `now`, from the cache when an entry is fresh, else read
    /// from `store` (and kept).
    pub async fn usable(
        &self,
        store: &dyn Database,
        terminal: &TerminalId,
        kt: KeyType,
        now: DateTime<Utc>,
    ) -> Result<Lookup, StoreError> {
        if !self.ttl.is_zero() {
            let entries = self.lock();
            if let Some(entry) = entries.get(&(terminal.clone(), kt))
                && entry.read_at.elapsed() < self.ttl
                && entry.read_for <= now
            {
                self.hits.inc();
                return Ok(Lookup {
                    keys: usable_at(entry.rows.iter().cloned(), now),
                    cached: true,
                });
            }
        }
        self.read(store, terminal, kt, now).await
    }

    /// Reads the keys from `store` whatever the cache holds, and keeps them.
    pub async fn read(
        &self,
        store: &dyn Database,
        terminal: &TerminalId,
        kt: KeyType,
        now: DateTime<Utc>,
    ) -> Result<Lookup, StoreError> {
        self.misses.inc();
        let generation = self.generation.load(Ordering::Acquire);
        let read_at = Instant::now();
        let keys = store.keys_for_use(terminal, kt, now).await?;
        if !self.ttl.is_zero() {
            let mut entries = self.lock();
            // an invalidation since the read began may have changed what it saw
            if self.generation.load(Ordering::Acquire) == generation {
                let rows = keys
                    .active
                    .iter()
                    .chain(keys.pending.iter())
                    .chain(keys.in_grace.iter())
                    .cloned()
                    .collect();
                entries.insert(
                    (terminal.clone(), kt),
                    Entry {
                        rows,
                        read_for: now,
                        read_at,
                    },
                );
            }
        }
        Ok(Lookup {
            keys,
            cached: false,
        })
    }

    /// Forgets `terminal`'s keys (after a change to them).
    pub fn invalidate(&self, terminal: &TerminalId) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        // by key, not a scan: every replica does this for each key change in the fleet
        for kt in [KeyType::Tmk, KeyType::Tpk, KeyType::Tak] {
            entries.remove(&(terminal.clone(), kt));
        }
    }

    /// Forgets every terminal's keys (after a change to many, or to one not known by id).
    pub fn invalidate_all(&self) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }
}

/// The store, with every key-changing call invalidating the [`KeyCache`] (see the module
/// documentation). Everything else passes through unchanged.
#[derive(Debug)]
pub struct KeyCachingStore {
    inner: Store,
    cache: Arc<KeyCache>,
}

impl KeyCachingStore {
    /// Wraps `inner`, invalidating `cache`.
    pub fn new(inner: Store, cache: Arc<KeyCache>) -> Self {
        Self { inner, cache }
    }
}

#[async_trait]
impl Database for KeyCachingStore {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    async fn migrate(&self) -> Result<(), StoreError> {
        self.inner.migrate().await
    }
    async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        self.inner.migration_status().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }
    async fn close(&self) {
        self.inner.close().await
    }
    async fn create_terminal(&self, t: &NewTerminal, actor: &str) -> Result<Terminal, StoreError> {
        let result = self.inner.create_terminal(t, actor).await;
        self.cache.invalidate(&t.id);
        result
    }
    async fn create_terminals_bulk(
        &self,
        terminals: &[NewTerminal],
        actor: &str,
    ) -> Result<u64, StoreError> {
        let result = self.inner.create_terminals_bulk(terminals, actor).await;
        self.cache.invalidate_all();
        result
    }
    async fn get_terminal(&self, id: &TerminalId) -> Result<Option<Terminal>, StoreError> {
        self.inner.get_terminal(id).await
    }
    async fn list_terminals(&self, page: Page) -> Result<Vec<Terminal>, StoreError> {
        self.inner.list_terminals(page).await
    }
    async fn terminals_in(&self, sel: &TerminalSelector) -> Result<Vec<TerminalId>, StoreError> {
        self.inner.terminals_in(sel).await
    }
    async fn insert_key(&self, k: &NewKey, actor: &str) -> Result<KeyRecord, StoreError> {
        let result = self.inner.insert_key(k, actor).await;
        self.cache.invalidate(&k.terminal_id);
        result
    }
    async fn insert_keys_bulk(
        &self,
        keys: &[NewKey],
        rotation: &NewRotation,
        actor: &str,
    ) -> Result<(), StoreError> {
        let result = self.inner.insert_keys_bulk(keys, rotation, actor).await;
        self.cache.invalidate_all();
        result
    }
    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get_key(id).await
    }
    async fn list_keys(&self, terminal: &TerminalId) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list_keys(terminal).await
    }
    async fn keys_for_use(
        &self,
        terminal: &TerminalId,
        kt: KeyType,
        now: DateTime<Utc>,
    ) -> Result<UsableKeys, StoreError> {
        // callers of the trait get the store's answer; the cached path is `KeyCache::usable`
        self.inner.keys_for_use(terminal, kt, now).await
    }
    async fn unbound_keys(
        &self,
        after: Option<&KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.unbound_keys(after, limit).await
    }
    async fn rewrap_key(
        &self,
        id: &KeyId,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> Result<bool, StoreError> {
        let result = self.inner.rewrap_key(id, old, new).await;
        // the row's terminal is not at hand; re-wrapping is a one-off migration
        self.cache.invalidate_all();
        result
    }
    async fn transition_key(
        &self,
        id: &KeyId,
        to: KeyTransition,
        grace: Duration,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, StoreError> {
        let result = self.inner.transition_key(id, to, grace, actor, now).await;
        match &result {
            Ok(key) => self.cache.invalidate(&key.terminal_id),
            // it may have committed before failing to answer: forget everything
            Err(_) => self.cache.invalidate_all(),
        }
        result
    }
    async fn rotation_totals(
        &self,
        rotation: &RotationId,
    ) -> Result<Option<RotationStatus>, StoreError> {
        self.inner.rotation_totals(rotation).await
    }
    async fn expire_previous(
        &self,
        rotation: &RotationId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let result = self.inner.expire_previous(rotation, actor, now).await;
        self.cache.invalidate_all();
        result
    }
    async fn key_stats(&self) -> Result<KeyStats, StoreError> {
        self.inner.key_stats().await
    }
    async fn due_pending_keys(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.due_pending_keys(now, limit).await
    }
    async fn create_account(&self, a: &NewAccount, actor: &str) -> Result<Account, StoreError> {
        self.inner.create_account(a, actor).await
    }
    async fn get_account(&self, id: &AccountId) -> Result<Option<Account>, StoreError> {
        self.inner.get_account(id).await
    }
    async fn create_card(&self, c: &NewCard, actor: &str) -> Result<Card, StoreError> {
        self.inner.create_card(c, actor).await
    }
    async fn get_card(&self, id: &CardId) -> Result<Option<Card>, StoreError> {
        self.inner.get_card(id).await
    }
    async fn find_card(&self, pan_token: &str) -> Result<Option<Card>, StoreError> {
        self.inner.find_card(pan_token).await
    }
    async fn reserve_pin_try(
        &self,
        card: &CardId,
        now: DateTime<Utc>,
    ) -> Result<PinReservation, StoreError> {
        self.inner.reserve_pin_try(card, now).await
    }
    async fn release_pin_try(&self, card: &CardId) -> Result<(), StoreError> {
        self.inner.release_pin_try(card).await
    }
    async fn authorization_view(&self, key: &ViewKey) -> Result<AuthView, StoreError> {
        self.inner.authorization_view(key).await
    }
    async fn reset_pin(&self, card: &CardId, pvv: &str, actor: &str) -> Result<(), StoreError> {
        self.inner.reset_pin(card, pvv, actor).await
    }
    async fn find_request(&self, id: &RequestIdentity) -> Result<Option<JournalEntry>, StoreError> {
        self.inner.find_request(id).await
    }
    async fn authorize(&self, req: &AuthRequest) -> Result<AuthOutcome, StoreError> {
        self.inner.authorize(req).await
    }
    async fn reverse(&self, req: &ReversalRequest) -> Result<AuthOutcome, StoreError> {
        self.inner.reverse(req).await
    }
    async fn reserve_stans(&self, station: &str, count: u32) -> Result<u32, StoreError> {
        self.inner.reserve_stans(station, count).await
    }
    async fn link_keys(&self, upstream: &str) -> Result<Option<LinkKeys>, StoreError> {
        self.inner.link_keys(upstream).await
    }
    async fn save_link_keys(&self, upstream: &str, keys: &LinkKeys) -> Result<(), StoreError> {
        self.inner.save_link_keys(upstream, keys).await
    }
    async fn accept_sign_on(
        &self,
        terminal: &TerminalId,
        stan: &str,
        transmitted: &str,
        now: DateTime<Utc>,
        prune_before: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.inner
            .accept_sign_on(terminal, stan, transmitted, now, prune_before)
            .await
    }
    async fn append_audit(&self, e: &NewAudit) -> Result<(), StoreError> {
        self.inner.append_audit(e).await
    }
    async fn list_audit(
        &self,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.list_audit(since, limit).await
    }
    async fn idempotency_get(
        &self,
        key_mac: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner.idempotency_get(key_mac).await
    }
    async fn idempotency_finish(
        &self,
        claim: &IdempotencyClaim,
        answer: &StoredAnswer,
    ) -> Result<bool, StoreError> {
        self.inner.idempotency_finish(claim, answer).await
    }
    async fn purge_idempotency(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.inner.purge_idempotency(before, limit).await
    }
    async fn saf_enqueue(&self, a: &NewAdvice) -> Result<EnqueueOutcome, StoreError> {
        self.inner.saf_enqueue(a).await
    }
    async fn saf_lease(
        &self,
        destination: Option<&str>,
        holder: &str,
        lease: Duration,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Advice>, StoreError> {
        self.inner
            .saf_lease(destination, holder, lease, limit, now)
            .await
    }
    async fn saf_complete(
        &self,
        id: AdviceId,
        holder: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.inner.saf_complete(id, holder, now).await
    }
    async fn saf_complete_many(
        &self,
        ids: &[AdviceId],
        holder: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<AdviceId>, StoreError> {
        self.inner.saf_complete_many(ids, holder, now).await
    }
    async fn saf_fail(
        &self,
        id: AdviceId,
        holder: &str,
        failure: &AdviceFailure,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<FailOutcome, StoreError> {
        self.inner.saf_fail(id, holder, failure, policy, now).await
    }
    async fn saf_get(&self, id: AdviceId) -> Result<Option<Advice>, StoreError> {
        self.inner.saf_get(id).await
    }
    async fn saf_list(&self, filter: &SafFilter, page: Page) -> Result<Vec<Advice>, StoreError> {
        self.inner.saf_list(filter, page).await
    }
    async fn saf_stats(&self, now: DateTime<Utc>) -> Result<SafStats, StoreError> {
        self.inner.saf_stats(now).await
    }
    async fn saf_retry(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError> {
        self.inner.saf_retry(id, actor, now).await
    }
    async fn saf_cancel(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError> {
        self.inner.saf_cancel(id, actor, now).await
    }
    async fn saf_requeue_dead_letter(
        &self,
        id: AdviceId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Advice, StoreError> {
        self.inner.saf_requeue_dead_letter(id, actor, now).await
    }
    async fn register_replica(
        &self,
        replica: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        self.inner.register_replica(replica, lease, now).await
    }
    async fn renew_replica(
        &self,
        replica: &str,
        lease: Duration,
        active: &[i64],
        now: DateTime<Utc>,
    ) -> Result<RegistrySweep, StoreError> {
        self.inner.renew_replica(replica, lease, active, now).await
    }
    async fn release_replica(&self, replica: &str) -> Result<(), StoreError> {
        self.inner.release_replica(replica).await
    }
    async fn record_sign_on(
        &self,
        entry: &SessionEntry,
        now: DateTime<Utc>,
    ) -> Result<Vec<SessionRef>, StoreError> {
        self.inner.record_sign_on(entry, now).await
    }
    async fn record_session_end(&self, replica: &str, conn_id: i64) -> Result<bool, StoreError> {
        self.inner.record_session_end(replica, conn_id).await
    }
    async fn remove_sessions(&self, terminal: &TerminalId) -> Result<Vec<SessionRef>, StoreError> {
        self.inner.remove_sessions(terminal).await
    }
    async fn live_sessions(
        &self,
        terminals: &[TerminalId],
        now: DateTime<Utc>,
    ) -> Result<Vec<LiveSession>, StoreError> {
        self.inner.live_sessions(terminals, now).await
    }
    async fn fleet_sessions(&self, now: DateTime<Utc>) -> Result<FleetSessions, StoreError> {
        self.inner.fleet_sessions(now).await
    }
    async fn set_rotation_pacing(
        &self,
        rotation: &RotationId,
        max_concurrent: u32,
    ) -> Result<(), StoreError> {
        self.inner
            .set_rotation_pacing(rotation, max_concurrent)
            .await
    }
    async fn due_pushes(&self, replica: &str, limit: u32) -> Result<Vec<PushDue>, StoreError> {
        self.inner.due_pushes(replica, limit).await
    }
    async fn claim_push(
        &self,
        key: &KeyId,
        replica: &str,
        conn_id: i64,
        now: DateTime<Utc>,
        answer_by: DateTime<Utc>,
    ) -> Result<PushClaim, StoreError> {
        self.inner
            .claim_push(key, replica, conn_id, now, answer_by)
            .await
    }
    async fn push_answered(
        &self,
        replica: &str,
        conn_id: i64,
        terminal: &TerminalId,
        kt: KeyType,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        self.inner
            .push_answered(replica, conn_id, terminal, kt, now)
            .await
    }
}

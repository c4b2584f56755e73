//! Every replica acts on the whole fleet (issue 16): the store's session registry, prompt
//! closing of a session replaced at another replica, and key pushes made by whichever replica
//! holds the terminal's session.
//!
//! # The registry
//!
//! Each replica has an id ([`replica_id`]) and a lease in the store that its heartbeat renews
//! every `[registry] heartbeat_interval`; each sign-on, sign-off and disconnect is recorded
//! against it. A replica that dies stops renewing, and once its lease (`[registry] lease`) has
//! ended any replica's heartbeat removes its sessions, so the fleet stops counting them within
//! `lease + heartbeat_interval`. A restarted replica removes its own sessions of the earlier run
//! before it serves. The admin API's session state and `switchyard_terminals_signed_on` read the
//! registry, so every replica answers the same.
//!
//! # One live session per ATM
//!
//! An ATM's sign-on removes its other sessions from the registry in the same transaction. Their
//! replicas close them: at once on PostgreSQL (a trigger `NOTIFY`s `switchyard_sessions` with
//! the removed session, see [`listen`]), and at the latest at their next heartbeat, which closes
//! any local session the registry no longer holds (the safety net for a missed notification).
//!
//! # Key pushes
//!
//! A replica pushes the PENDING keys of the ATMs it holds ([`push_round`]): after a sign-on, when
//! a key is made or answered anywhere (`NOTIFY switchyard_keys` / `switchyard_pushes`), and every
//! second. Each push is first claimed in the store, which records it per session (a key is
//! pushed once per session; a confirmed key is ACTIVE and never pushed again) and counts a
//! paced rotation's unanswered pushes across the fleet against its `maxConcurrent`. Key changes
//! also drop the changed terminal's entries from every replica's key cache.
//!
//! On SQLite (one replica) the same code runs, without notifications: the replica acts on its
//! own changes directly.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::SwitchContext;
use super::key_exchange::push_key;
use crate::domain::TerminalId;
use crate::settings::RegistrySettings;
use crate::store::{PushClaim, SessionRef};

/// How long a pushed key holds one of its rotation's `maxConcurrent` slots when its terminal
/// does not answer; the key stays PENDING (pushed again at the terminal's next sign-on).
pub const PUSH_ANSWER_WAIT: Duration = Duration::from_secs(30);

/// How often a replica looks for keys to push without being woken.
const PUSH_POLL: Duration = Duration::from_secs(1);

/// Keys looked at per query of a push round.
const PUSH_BATCH: u32 = 500;

/// PostgreSQL notification channels (see the session registry migration).
const SESSIONS_CHANNEL: &str = "switchyard_sessions";
const KEYS_CHANNEL: &str = "switchyard_keys";
const PUSHES_CHANNEL: &str = "switchyard_pushes";

/// This replica's part in the fleet.
#[derive(Debug)]
pub struct Fleet {
    replica: String,
    settings: RegistrySettings,
    registered: AtomicBool,
    wake: Notify,
    /// Sessions that ended while the store could not record it; retried by the heartbeat.
    unrecorded_ends: Mutex<Vec<i64>>,
    /// Unix milliseconds of the last heartbeat: traffic after it is recorded at the next one.
    last_beat_ms: AtomicI64,
    /// Connections whose sign-on is recorded in the registry but not yet locally (or the
    /// other way round): the heartbeat leaves them alone.
    signing_on: Mutex<HashSet<i64>>,
    /// Terminals whose own key request (0800/161) is being answered: the pusher leaves them
    /// alone until the delivered key is recorded as theirs.
    exchanging: Mutex<HashSet<TerminalId>>,
    /// Serializes reading the registry's count and setting the gauge, so that the last value
    /// set is the last one read (concurrent sign-ons would otherwise leave an older count).
    gauge: tokio::sync::Mutex<()>,
}

impl Fleet {
    /// This replica, not registered yet.
    pub fn new(settings: &RegistrySettings) -> Self {
        Self {
            replica: settings.replica_id.clone().unwrap_or_else(replica_id),
            settings: settings.clone(),
            registered: AtomicBool::new(false),
            wake: Notify::new(),
            unrecorded_ends: Mutex::new(Vec::new()),
            gauge: tokio::sync::Mutex::new(()),
            last_beat_ms: AtomicI64::new(0),
            signing_on: Mutex::new(HashSet::new()),
            exchanging: Mutex::new(HashSet::new()),
        }
    }

    /// This replica's id in the registry.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether this replica's stale sessions are cleared and its lease runs (sign-ons wait for
    /// it, since registering removes the replica's sessions).
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// Makes the push loop look for keys to push now.
    pub fn wake_pusher(&self) {
        self.wake.notify_one();
    }

    /// Registers the replica: its sessions of an earlier run are removed, its lease starts.
    pub async fn register(&self, ctx: &SwitchContext) -> bool {
        match ctx
            .store
            .register_replica(&self.replica, self.settings.lease, Utc::now())
            .await
        {
            Ok(stale) => {
                self.registered.store(true, Ordering::Release);
                info!(replica = %self.replica, stale_sessions = stale, "replica registered in the session registry");
                true
            }
            Err(err) => {
                warn!(replica = %self.replica, error = %err, "failed to register in the session registry; will retry");
                false
            }
        }
    }

    /// Records that a session ended (sign-off, disconnect), retrying at the next heartbeat when
    /// the store cannot take it now.
    pub async fn session_ended(&self, ctx: &SwitchContext, conn_id: u64) {
        let conn = conn_id as i64;
        if let Err(err) = ctx.store.record_session_end(&self.replica, conn).await {
            debug!(conn_id, error = %err, "failed to record a session's end; retried at the next heartbeat");
            self.lock_ends().push(conn);
        }
        self.refresh_gauge(ctx).await;
    }

    /// Sets `switchyard_terminals_signed_on` from the registry (fleet-wide). Called after this
    /// replica's own sign-ons and sign-offs, so it moves with them, and every heartbeat, so it
    /// follows the other replicas'.
    pub async fn refresh_gauge(&self, ctx: &SwitchContext) {
        let _serial = self.gauge.lock().await;
        if let Ok(fleet) = ctx.store.fleet_sessions(Utc::now()).await {
            ctx.metrics
                .terminals_signed_on
                .set(i64::try_from(fleet.terminals).unwrap_or(i64::MAX));
        }
    }

    fn lock_ends(&self) -> std::sync::MutexGuard<'_, Vec<i64>> {
        self.unrecorded_ends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn lock_signing_on(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.signing_on.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks connection `conn_id` as between its sign-on's registry write and its local
    /// registration, until the guard is dropped.
    pub fn signing_on(&self, conn_id: u64) -> SigningOn<'_> {
        self.lock_signing_on().insert(conn_id as i64);
        SigningOn {
            fleet: self,
            conn_id: conn_id as i64,
        }
    }

    fn lock_exchanging(&self) -> std::sync::MutexGuard<'_, HashSet<TerminalId>> {
        self.exchanging.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `terminal` as receiving a key it asked for, until the guard is dropped.
    pub fn exchanging(&self, terminal: &TerminalId) -> Exchanging<'_> {
        self.lock_exchanging().insert(terminal.clone());
        Exchanging {
            fleet: self,
            terminal: terminal.clone(),
        }
    }

    /// Closes the local sessions among `removed` (replaced or signed off through the registry).
    pub fn close_removed(&self, ctx: &SwitchContext, removed: &[SessionRef]) {
        for old in removed.iter().filter(|old| old.replica == self.replica) {
            if ctx.sessions.close_conn(&old.terminal, old.conn_id as u64) {
                info!(terminal = %old.terminal, conn_id = old.conn_id, "session closed: replaced or signed off through the registry");
            }
        }
    }
}

/// A sign-on in progress on one connection ([`Fleet::signing_on`]).
#[derive(Debug)]
pub struct SigningOn<'a> {
    fleet: &'a Fleet,
    conn_id: i64,
}

impl Drop for SigningOn<'_> {
    fn drop(&mut self) {
        self.fleet.lock_signing_on().remove(&self.conn_id);
    }
}

/// A terminal's own key request being answered ([`Fleet::exchanging`]).
#[derive(Debug)]
pub struct Exchanging<'a> {
    fleet: &'a Fleet,
    terminal: TerminalId,
}

impl Drop for Exchanging<'_> {
    fn drop(&mut self) {
        self.fleet.lock_exchanging().remove(&self.terminal);
    }
}

/// This process's replica id when `[registry] replica_id` is not set: `POD_NAME` (the Downward
/// API), else `HOSTNAME` inside Kubernetes (where it is the pod name), else the host name with a
/// random suffix (two processes on one host must differ).
pub fn replica_id() -> String {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if let Some(pod) = env("POD_NAME") {
        return pod;
    }
    if env("KUBERNETES_SERVICE_HOST").is_some()
        && let Some(host) = env("HOSTNAME")
    {
        return host;
    }
    let host = env("HOSTNAME")
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "switch".into());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Renews the lease every heartbeat until `stop`; registers first if that has not happened.
/// Each beat also records the local sessions' traffic, retries unrecorded session ends, closes
/// local sessions the registry no longer holds, and removes registry rows of this replica that
/// no local session backs.
pub async fn heartbeat(ctx: Arc<SwitchContext>, stop: CancellationToken) {
    let fleet = &ctx.fleet;
    let mut ticker = tokio::time::interval(fleet.settings.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !fleet.is_registered() {
            fleet.register(&ctx).await;
            continue;
        }
        beat(&ctx).await;
    }
}

/// One heartbeat (see [`heartbeat`]).
pub async fn beat(ctx: &SwitchContext) {
    let fleet = &ctx.fleet;
    let ends: Vec<i64> = std::mem::take(&mut *fleet.lock_ends());
    for (i, conn) in ends.iter().enumerate() {
        if ctx
            .store
            .record_session_end(&fleet.replica, *conn)
            .await
            .is_err()
        {
            fleet.lock_ends().extend_from_slice(&ends[i..]);
            return;
        }
    }
    // Taken before the registry is read: every session in it was recorded before the read, so
    // one missing from the registry's answer was removed, not merely not written yet.
    let local = ctx.sessions.snapshot();
    let since = fleet
        .last_beat_ms
        .swap(Utc::now().timestamp_millis(), Ordering::Relaxed);
    let active: Vec<i64> = local
        .iter()
        .filter(|s| s.last_seen_ms >= since)
        .map(|s| s.conn_id as i64)
        .collect();
    let sweep = match ctx
        .store
        .renew_replica(&fleet.replica, fleet.settings.lease, &active, Utc::now())
        .await
    {
        Ok(sweep) => sweep,
        Err(err) => {
            warn!(replica = %fleet.replica, error = %err, "failed to renew the registry lease; will retry");
            return;
        }
    };
    fleet.refresh_gauge(ctx).await;
    if sweep.re_registered {
        warn!(replica = %fleet.replica, "registry lease had ended (others removed this replica's sessions); renewed");
    }
    if sweep.expired_sessions > 0 {
        info!(
            sessions = sweep.expired_sessions,
            "removed the sessions of replicas whose lease ended"
        );
    }
    // connections between their sign-on's registry write and its local registration
    let signing_on = fleet.lock_signing_on().clone();
    let recorded: HashSet<(TerminalId, i64)> = sweep
        .own
        .iter()
        .map(|s| (s.terminal.clone(), s.conn_id))
        .collect();
    for session in &local {
        let conn = session.conn_id as i64;
        if !signing_on.contains(&conn)
            && !recorded.contains(&(session.terminal.clone(), conn))
            && ctx.sessions.close_conn(&session.terminal, session.conn_id)
        {
            info!(terminal = %session.terminal, conn_id = session.conn_id, "session closed: the registry no longer holds it (replaced or signed off elsewhere)");
        }
    }
    // rows of this replica that no local session backs (a connection that closed while the
    // store could not record it, say)
    let now_local: HashSet<(TerminalId, i64)> = ctx
        .sessions
        .snapshot()
        .into_iter()
        .map(|s| (s.terminal, s.conn_id as i64))
        .collect();
    let signing_on = fleet.lock_signing_on().clone();
    for row in &sweep.own {
        if !signing_on.contains(&row.conn_id)
            && !now_local.contains(&(row.terminal.clone(), row.conn_id))
        {
            let _ = ctx
                .store
                .record_session_end(&fleet.replica, row.conn_id)
                .await;
        }
    }
}

/// Pushes keys until `stop`: when woken ([`Fleet::wake_pusher`]) and every second.
pub async fn pusher(ctx: Arc<SwitchContext>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ctx.fleet.wake.notified() => {}
            _ = tokio::time::sleep(PUSH_POLL) => {}
        }
        if ctx.fleet.is_registered() {
            push_round(&ctx).await;
        }
    }
}

/// Pushes the due keys of this replica's sessions (see the module documentation). Returns how
/// many were pushed.
pub async fn push_round(ctx: &SwitchContext) -> usize {
    let fleet = &ctx.fleet;
    let mut pushed = 0;
    let mut full = HashSet::new();
    let mut skipped = HashSet::new();
    loop {
        let due = match ctx.store.due_pushes(&fleet.replica, PUSH_BATCH).await {
            Ok(due) => due,
            Err(err) => {
                debug!(error = %err, "failed to read keys to push; will retry");
                return pushed;
            }
        };
        let batch = due.len();
        let mut progressed = false;
        for item in due {
            if skipped.contains(&item.key_id)
                || item.rotation.as_ref().is_some_and(|r| full.contains(r))
            {
                continue;
            }
            skipped.insert(item.key_id.clone());
            if fleet.lock_exchanging().contains(&item.terminal) {
                continue;
            }
            // the session must still be this process's (it may have closed since the query)
            let Some(session) = ctx.sessions.handle(&item.terminal) else {
                continue;
            };
            if session.conn_id as i64 != item.conn_id {
                continue;
            }
            let now = Utc::now();
            let answer_by = now
                + chrono::Duration::from_std(PUSH_ANSWER_WAIT).unwrap_or(chrono::Duration::zero());
            match ctx
                .store
                .claim_push(&item.key_id, &fleet.replica, item.conn_id, now, answer_by)
                .await
            {
                Ok(PushClaim::Claimed) => {
                    progressed = true;
                    let key = match ctx.store.get_key(&item.key_id).await {
                        Ok(Some(key)) => key,
                        _ => continue,
                    };
                    if push_key(ctx, &item.terminal, &key).await {
                        pushed += 1;
                    }
                }
                Ok(PushClaim::RotationFull) => {
                    if let Some(rotation) = item.rotation {
                        full.insert(rotation);
                    }
                }
                Ok(PushClaim::NotDue) => {}
                Err(err) => {
                    debug!(error = %err, "failed to claim a key push; will retry");
                    return pushed;
                }
            }
        }
        // a full batch may hide more keys behind the ones just handled
        if batch < PUSH_BATCH as usize || !progressed {
            return pushed;
        }
    }
}

/// Listens for the other replicas' notifications on PostgreSQL until `stop` (see the module
/// documentation). A lost connection is re-opened; since notifications may have been missed
/// meanwhile, every cached key is dropped and the pusher runs (the heartbeat covers sessions).
pub async fn listen(
    ctx: Arc<SwitchContext>,
    url: zeroize::Zeroizing<String>,
    stop: CancellationToken,
) {
    let retry = ctx.fleet.settings.heartbeat_interval;
    loop {
        let connected = async {
            let mut listener = sqlx::postgres::PgListener::connect(url.as_str()).await?;
            listener
                .listen_all([SESSIONS_CHANNEL, KEYS_CHANNEL, PUSHES_CHANNEL])
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            connected = connected => match connected {
                Ok(listener) => listener,
                Err(err) => {
                    warn!(error = %err, "failed to listen for registry notifications; will retry");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(retry) => continue,
                    }
                }
            },
        };
        debug!("listening for registry notifications");
        caught_up(&ctx);
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => {
                    on_notification(&ctx, notification.channel(), notification.payload())
                }
                // the connection was lost; the next call reconnects
                Ok(None) => caught_up(&ctx),
                Err(err) => {
                    warn!(error = %err, "registry notifications interrupted; reconnecting");
                    break;
                }
            }
        }
    }
}

/// After a gap in notifications: nothing cached may be trusted, and keys may be due.
fn caught_up(ctx: &SwitchContext) {
    ctx.keys.invalidate_all();
    ctx.fleet.wake_pusher();
}

/// Acts on one notification. Payloads are hints: each is checked against local state, and an
/// unknown one is ignored.
pub fn on_notification(ctx: &SwitchContext, channel: &str, payload: &str) {
    match channel {
        SESSIONS_CHANNEL => {
            let mut parts = payload.splitn(3, ' ');
            let (Some(replica), Some(conn), Some(terminal)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return;
            };
            let (Ok(conn_id), Ok(terminal)) = (conn.parse::<i64>(), TerminalId::new(terminal))
            else {
                return;
            };
            // a connection signing on as another terminal removed its own previous row; its
            // sign-on moves it locally
            if ctx.fleet.lock_signing_on().contains(&conn_id) {
                return;
            }
            ctx.fleet.close_removed(
                ctx,
                &[SessionRef {
                    replica: replica.to_string(),
                    conn_id,
                    terminal,
                }],
            );
        }
        KEYS_CHANNEL => {
            match payload {
                "*" => ctx.keys.invalidate_all(),
                terminal => match TerminalId::new(terminal) {
                    Ok(terminal) => ctx.keys.invalidate(&terminal),
                    Err(_) => ctx.keys.invalidate_all(),
                },
            }
            ctx.fleet.wake_pusher();
        }
        PUSHES_CHANNEL => ctx.fleet.wake_pusher(),
        _ => {}
    }
}

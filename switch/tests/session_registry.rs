//! Store stories of the fleet-wide session registry (issue 16): replica leases, one live ATM
//! session across replicas, expiry of a dead replica's sessions, and key pushes claimed once per
//! session and paced across the fleet. Run against SQLite (always) and PostgreSQL (when
//! `SWITCHYARD_TEST_DATABASE_URL` is set; required when `CI=true`).
//!
//! Each PostgreSQL test runs in its own freshly created schema, so the tests run in parallel.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use switchyard_switch::domain::{KeyState, KeyType, TerminalId, WrappedKey};
use switchyard_switch::store::*;

#[path = "common/backends.rs"]
mod backends;
use backends::*;
stories!(
    an_atm_has_one_session_across_replicas,
    stations_keep_a_session_per_connection,
    a_dead_replicas_sessions_expire_with_its_lease,
    a_restarted_replica_clears_its_stale_sessions,
    sessions_end_and_operators_sign_off,
    pushes_are_claimed_once_per_session,
    a_paced_rotation_is_paced_across_the_fleet,
);

// ---------------------------------------------------------------------------------------------
// helpers

const LEASE: Duration = Duration::from_secs(10);

fn tid(s: &str) -> TerminalId {
    TerminalId::new(s).unwrap()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap()
}

fn at(secs: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::seconds(secs)
}

async fn terminal(store: &Store, id: &str, kind: TerminalKind) -> TerminalId {
    let t = NewTerminal {
        id: tid(id),
        group: "jakarta".into(),
        kind,
    };
    store.create_terminal(&t, "admin").await.unwrap();
    t.id
}

fn entry(replica: &str, conn_id: i64, terminal: &TerminalId, kind: TerminalKind) -> SessionEntry {
    SessionEntry {
        replica: replica.into(),
        conn_id,
        terminal: terminal.clone(),
        kind,
        remote: format!("10.0.0.{conn_id}:4000"),
        signed_on_at: t0(),
    }
}

fn session_ref(replica: &str, conn_id: i64, terminal: &TerminalId) -> SessionRef {
    SessionRef {
        replica: replica.into(),
        conn_id,
        terminal: terminal.clone(),
    }
}

/// (replica, connection) of the live sessions of `terminals` at `now`.
async fn live(store: &Store, terminals: &[TerminalId], now: DateTime<Utc>) -> Vec<(String, i64)> {
    store
        .live_sessions(terminals, now)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.replica, s.conn_id))
        .collect()
}

fn pending_key(terminal: &TerminalId, rotation: Option<&RotationId>) -> NewKey {
    NewKey {
        terminal_id: terminal.clone(),
        key_type: KeyType::Tpk,
        state: KeyState::Pending,
        wrapped: WrappedKey::new(format!("WRAPPED-{}", uuid::Uuid::new_v4().simple())),
        kcv: "1A2B3C".into(),
        rotation_id: rotation.cloned(),
        grace_seconds: 300,
    }
}

fn claim_deadline(now: DateTime<Utc>) -> DateTime<Utc> {
    now + chrono::Duration::seconds(30)
}

// ---------------------------------------------------------------------------------------------
// stories

async fn an_atm_has_one_session_across_replicas(store: Store) {
    let atm = terminal(&store, "ATM1", TerminalKind::Atm).await;
    for replica in ["switch-a", "switch-b"] {
        assert_eq!(
            store.register_replica(replica, LEASE, t0()).await.unwrap(),
            0
        );
    }
    let first = entry("switch-a", 1, &atm, TerminalKind::Atm);
    assert!(store.record_sign_on(&first, t0()).await.unwrap().is_empty());
    // signing on again on the same connection replaces nothing
    assert!(
        store
            .record_sign_on(&first, at(1))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        live(&store, std::slice::from_ref(&atm), at(1)).await,
        vec![("switch-a".into(), 1)]
    );

    // the same ATM at another replica: its session at switch-a is removed and named
    let removed = store
        .record_sign_on(&entry("switch-b", 7, &atm, TerminalKind::Atm), at(2))
        .await
        .unwrap();
    assert_eq!(removed, vec![session_ref("switch-a", 1, &atm)]);
    let sessions = store
        .live_sessions(std::slice::from_ref(&atm), at(2))
        .await
        .unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        (
            sessions[0].replica.as_str(),
            sessions[0].conn_id,
            sessions[0].remote.as_str()
        ),
        ("switch-b", 7, "10.0.0.7:4000")
    );
    // the replaced connection's late disconnect removes nothing of its successor
    assert!(!store.record_session_end("switch-a", 1).await.unwrap());
    assert_eq!(
        live(&store, std::slice::from_ref(&atm), at(2)).await,
        vec![("switch-b".into(), 7)]
    );

    // a connection signing on as another terminal gives up its previous session (its own
    // replica handles that connection, so it is not among the sessions to close)
    let other = terminal(&store, "ATM2", TerminalKind::Atm).await;
    let removed = store
        .record_sign_on(&entry("switch-b", 7, &other, TerminalKind::Atm), at(3))
        .await
        .unwrap();
    assert!(removed.is_empty(), "{removed:?}");
    assert!(
        live(&store, std::slice::from_ref(&atm), at(3))
            .await
            .is_empty()
    );

    let fleet = store.fleet_sessions(at(3)).await.unwrap();
    assert_eq!(fleet.terminals, 1);
    let counts: Vec<(String, u64)> = fleet
        .replicas
        .iter()
        .map(|r| (r.replica.clone(), r.sessions))
        .collect();
    assert_eq!(counts, vec![("switch-a".into(), 0), ("switch-b".into(), 1)]);
}

async fn stations_keep_a_session_per_connection(store: Store) {
    let station = terminal(&store, "ACQ001", TerminalKind::Station).await;
    for replica in ["switch-a", "switch-b"] {
        store.register_replica(replica, LEASE, t0()).await.unwrap();
    }
    for (replica, conn) in [("switch-a", 1), ("switch-a", 2), ("switch-b", 1)] {
        let removed = store
            .record_sign_on(&entry(replica, conn, &station, TerminalKind::Station), t0())
            .await
            .unwrap();
        assert!(removed.is_empty(), "a station's sign-on replaces nothing");
    }
    assert_eq!(
        live(&store, std::slice::from_ref(&station), at(1))
            .await
            .len(),
        3
    );
    assert_eq!(store.fleet_sessions(at(1)).await.unwrap().terminals, 1);
}

async fn a_dead_replicas_sessions_expire_with_its_lease(store: Store) {
    let (one, two) = (
        terminal(&store, "ATM1", TerminalKind::Atm).await,
        terminal(&store, "ATM2", TerminalKind::Atm).await,
    );
    store
        .register_replica("switch-a", LEASE, t0())
        .await
        .unwrap();
    store
        .register_replica("switch-b", LEASE, t0())
        .await
        .unwrap();
    store
        .record_sign_on(&entry("switch-a", 1, &one, TerminalKind::Atm), t0())
        .await
        .unwrap();
    store
        .record_sign_on(&entry("switch-b", 1, &two, TerminalKind::Atm), t0())
        .await
        .unwrap();

    // switch-b keeps renewing; switch-a died after t0
    let sweep = store
        .renew_replica("switch-b", LEASE, &[1], at(5))
        .await
        .unwrap();
    assert_eq!(sweep.expired_sessions, 0);
    assert!(!sweep.re_registered);
    assert_eq!(sweep.own, vec![session_ref("switch-b", 1, &two)]);
    let both = [one.clone(), two.clone()];
    assert_eq!(live(&store, &both, at(9)).await.len(), 2);
    // once its lease has ended, switch-a's session no longer counts, even before a sweep
    assert_eq!(
        live(&store, &both, at(11)).await,
        vec![("switch-b".into(), 1)]
    );
    assert_eq!(store.fleet_sessions(at(11)).await.unwrap().terminals, 1);
    // and switch-b's next renewal removes it
    let sweep = store
        .renew_replica("switch-b", LEASE, &[], at(12))
        .await
        .unwrap();
    assert_eq!(sweep.expired_sessions, 1);
    let fleet = store.fleet_sessions(at(12)).await.unwrap();
    assert_eq!(fleet.replicas.len(), 1);
    assert_eq!(fleet.replicas[0].replica, "switch-b");
    // the traffic switch-b recorded at 5 s is what the fleet sees as last seen
    let seen = store
        .live_sessions(std::slice::from_ref(&two), at(12))
        .await
        .unwrap();
    assert_eq!(seen[0].last_seen, at(5));

    // switch-a comes back from a long pause: its lease is made again, it holds nothing
    let sweep = store
        .renew_replica("switch-a", LEASE, &[1], at(13))
        .await
        .unwrap();
    assert!(sweep.re_registered);
    assert!(sweep.own.is_empty());
    // a lease that is no lease is refused
    assert!(matches!(
        store
            .renew_replica("switch-a", Duration::ZERO, &[], at(14))
            .await,
        Err(StoreError::Invalid { .. })
    ));
    assert!(matches!(
        store.register_replica("", LEASE, at(14)).await,
        Err(StoreError::Invalid { .. })
    ));
}

async fn a_restarted_replica_clears_its_stale_sessions(store: Store) {
    let (one, two) = (
        terminal(&store, "ATM1", TerminalKind::Atm).await,
        terminal(&store, "ATM2", TerminalKind::Atm).await,
    );
    store
        .register_replica("switch-a", LEASE, t0())
        .await
        .unwrap();
    for (conn, t) in [(1, &one), (2, &two)] {
        store
            .record_sign_on(&entry("switch-a", conn, t, TerminalKind::Atm), t0())
            .await
            .unwrap();
    }
    // the process restarts under the same pod name, well within its old lease
    assert_eq!(
        store
            .register_replica("switch-a", LEASE, at(2))
            .await
            .unwrap(),
        2
    );
    assert!(live(&store, &[one, two], at(3)).await.is_empty());
    let fleet = store.fleet_sessions(at(3)).await.unwrap();
    assert_eq!(fleet.replicas[0].started_at, at(2));
    assert_eq!(fleet.terminals, 0);
}

async fn sessions_end_and_operators_sign_off(store: Store) {
    let atm = terminal(&store, "ATM1", TerminalKind::Atm).await;
    let station = terminal(&store, "ACQ001", TerminalKind::Station).await;
    store
        .register_replica("switch-a", LEASE, t0())
        .await
        .unwrap();
    store
        .register_replica("switch-b", LEASE, t0())
        .await
        .unwrap();
    store
        .record_sign_on(&entry("switch-a", 1, &atm, TerminalKind::Atm), t0())
        .await
        .unwrap();
    assert!(store.record_session_end("switch-a", 1).await.unwrap());
    assert!(!store.record_session_end("switch-a", 1).await.unwrap());
    assert!(
        live(&store, std::slice::from_ref(&atm), at(1))
            .await
            .is_empty()
    );

    for (replica, conn) in [("switch-a", 2), ("switch-b", 3)] {
        store
            .record_sign_on(&entry(replica, conn, &station, TerminalKind::Station), t0())
            .await
            .unwrap();
    }
    let mut removed = store.remove_sessions(&station).await.unwrap();
    removed.sort_by(|a, b| a.replica.cmp(&b.replica));
    assert_eq!(
        removed,
        vec![
            session_ref("switch-a", 2, &station),
            session_ref("switch-b", 3, &station)
        ]
    );
    assert!(store.remove_sessions(&station).await.unwrap().is_empty());

    // the replica stops cleanly: nothing of it is left
    store
        .record_sign_on(&entry("switch-a", 4, &atm, TerminalKind::Atm), t0())
        .await
        .unwrap();
    store.release_replica("switch-a").await.unwrap();
    let fleet = store.fleet_sessions(at(1)).await.unwrap();
    assert_eq!(
        fleet
            .replicas
            .iter()
            .map(|r| r.replica.as_str())
            .collect::<Vec<_>>(),
        vec!["switch-b"]
    );
    assert_eq!(fleet.terminals, 0);
}

async fn pushes_are_claimed_once_per_session(store: Store) {
    let atm = terminal(&store, "ATM1", TerminalKind::Atm).await;
    let station = terminal(&store, "ACQ001", TerminalKind::Station).await;
    store
        .register_replica("switch-a", LEASE, t0())
        .await
        .unwrap();
    store
        .register_replica("switch-b", LEASE, t0())
        .await
        .unwrap();
    let older = store
        .insert_key(&pending_key(&atm, None), "admin")
        .await
        .unwrap();
    let key = store
        .insert_key(&pending_key(&atm, None), "admin")
        .await
        .unwrap();
    store
        .insert_key(&pending_key(&station, None), "admin")
        .await
        .unwrap();
    // offline: nothing is due anywhere
    assert!(store.due_pushes("switch-a", 100).await.unwrap().is_empty());

    store
        .record_sign_on(&entry("switch-a", 1, &atm, TerminalKind::Atm), t0())
        .await
        .unwrap();
    store
        .record_sign_on(&entry("switch-b", 9, &station, TerminalKind::Station), t0())
        .await
        .unwrap();
    // the newest PENDING key of the ATM, on the replica holding it; never a station's
    let due = store.due_pushes("switch-a", 100).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (
            &due[0].key_id,
            &due[0].terminal,
            due[0].key_type,
            due[0].conn_id
        ),
        (&key.id, &atm, KeyType::Tpk, 1)
    );
    assert!(store.due_pushes("switch-b", 100).await.unwrap().is_empty());

    let now = at(1);
    assert_eq!(
        store
            .claim_push(&key.id, "switch-a", 1, now, claim_deadline(now))
            .await
            .unwrap(),
        PushClaim::Claimed
    );
    // once per session
    assert_eq!(
        store
            .claim_push(&key.id, "switch-a", 1, now, claim_deadline(now))
            .await
            .unwrap(),
        PushClaim::NotDue
    );
    assert!(store.due_pushes("switch-a", 100).await.unwrap().is_empty());
    // a session that does not exist gets nothing
    assert_eq!(
        store
            .claim_push(&key.id, "switch-a", 5, now, claim_deadline(now))
            .await
            .unwrap(),
        PushClaim::NotDue
    );

    // the ATM reconnects at switch-b: the key is due there, on its new session
    store
        .record_sign_on(&entry("switch-b", 2, &atm, TerminalKind::Atm), at(2))
        .await
        .unwrap();
    let due = store.due_pushes("switch-b", 100).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].key_id.clone(), due[0].conn_id), (key.id.clone(), 2));
    assert_eq!(
        store
            .claim_push(&key.id, "switch-b", 2, at(2), claim_deadline(at(2)))
            .await
            .unwrap(),
        PushClaim::Claimed
    );
    assert_eq!(
        store
            .push_answered("switch-b", 2, &atm, KeyType::Tpk, at(3))
            .await
            .unwrap(),
        1
    );

    // confirmed: ACTIVE keys are never pushed again, on any session
    store
        .transition_key(
            &key.id,
            KeyTransition::Activate,
            Duration::from_secs(300),
            "terminal",
            at(3),
        )
        .await
        .unwrap();
    store
        .record_sign_on(&entry("switch-a", 3, &atm, TerminalKind::Atm), at(4))
        .await
        .unwrap();
    let due = store.due_pushes("switch-a", 100).await.unwrap();
    assert!(due.iter().all(|d| d.key_id != key.id), "{due:?}");
    assert_eq!(
        store
            .claim_push(&key.id, "switch-a", 3, at(4), claim_deadline(at(4)))
            .await
            .unwrap(),
        PushClaim::NotDue
    );
    // the older PENDING key was never offered: only a terminal's newest is
    assert_eq!(
        store
            .claim_push(&older.id, "switch-a", 3, at(4), claim_deadline(at(4)))
            .await
            .unwrap(),
        PushClaim::Claimed,
        "a claim names its key; due_pushes is what picks the newest"
    );
}

async fn a_paced_rotation_is_paced_across_the_fleet(store: Store) {
    let mut atms = Vec::new();
    for i in 1..=4 {
        atms.push(terminal(&store, &format!("ATM{i}"), TerminalKind::Atm).await);
    }
    let rotation = NewRotation {
        id: RotationId::new("rot-paced").unwrap(),
        key_type: KeyType::Tpk,
        activation: Activation::OnConfirm,
        grace_seconds: 300,
    };
    assert!(matches!(
        store.set_rotation_pacing(&rotation.id, 0).await,
        Err(StoreError::Invalid { .. })
    ));
    store.set_rotation_pacing(&rotation.id, 2).await.unwrap();
    let keys: Vec<NewKey> = atms
        .iter()
        .map(|t| pending_key(t, Some(&rotation.id)))
        .collect();
    store
        .insert_keys_bulk(&keys, &rotation, "operator")
        .await
        .unwrap();
    store
        .register_replica("switch-a", LEASE, t0())
        .await
        .unwrap();
    store
        .register_replica("switch-b", LEASE, t0())
        .await
        .unwrap();
    // ATM1 and ATM2 at switch-a, ATM3 and ATM4 at switch-b
    for (i, atm) in atms.iter().enumerate() {
        let replica = if i < 2 { "switch-a" } else { "switch-b" };
        store
            .record_sign_on(&entry(replica, i as i64 + 1, atm, TerminalKind::Atm), t0())
            .await
            .unwrap();
    }
    let due_a = store.due_pushes("switch-a", 100).await.unwrap();
    let due_b = store.due_pushes("switch-b", 100).await.unwrap();
    assert_eq!((due_a.len(), due_b.len()), (2, 2));
    assert!(
        due_a
            .iter()
            .all(|d| d.rotation.as_ref() == Some(&rotation.id))
    );

    let now = at(1);
    let claim = |replica: &'static str, d: &PushDue| {
        let (store, d) = (store.clone(), d.clone());
        async move {
            store
                .claim_push(&d.key_id, replica, d.conn_id, now, claim_deadline(now))
                .await
                .unwrap()
        }
    };
    // one slot taken at each replica: the rotation is full everywhere
    assert_eq!(claim("switch-a", &due_a[0]).await, PushClaim::Claimed);
    assert_eq!(claim("switch-b", &due_b[0]).await, PushClaim::Claimed);
    assert_eq!(claim("switch-a", &due_a[1]).await, PushClaim::RotationFull);
    assert_eq!(claim("switch-b", &due_b[1]).await, PushClaim::RotationFull);

    // switch-b's terminal answers: a slot is free, for whichever replica claims it first
    store
        .push_answered(
            "switch-b",
            due_b[0].conn_id,
            &due_b[0].terminal,
            KeyType::Tpk,
            at(2),
        )
        .await
        .unwrap();
    assert_eq!(claim("switch-a", &due_a[1]).await, PushClaim::Claimed);
    assert_eq!(claim("switch-b", &due_b[1]).await, PushClaim::RotationFull);

    // switch-a's first terminal confirms (ACTIVE): its slot is free too
    store
        .transition_key(
            &due_a[0].key_id,
            KeyTransition::Activate,
            Duration::from_secs(300),
            "terminal",
            at(3),
        )
        .await
        .unwrap();
    assert_eq!(claim("switch-b", &due_b[1]).await, PushClaim::Claimed);
    let status = store.rotation_totals(&rotation.id).await.unwrap().unwrap();
    assert_eq!(status.totals[&KeyState::Active], 1);

    // a terminal that never answers frees its slot when the wait is over
    let later = at(40);
    let fresh = NewRotation {
        id: RotationId::new("rot-paced-2").unwrap(),
        ..rotation.clone()
    };
    store.set_rotation_pacing(&fresh.id, 1).await.unwrap();
    let fresh_keys: Vec<NewKey> = atms[2..]
        .iter()
        .map(|t| pending_key(t, Some(&fresh.id)))
        .collect();
    store
        .insert_keys_bulk(&fresh_keys, &fresh, "operator")
        .await
        .unwrap();
    let due = store.due_pushes("switch-b", 100).await.unwrap();
    let due: Vec<PushDue> = due
        .into_iter()
        .filter(|d| d.rotation.as_ref() == Some(&fresh.id))
        .collect();
    assert_eq!(due.len(), 2);
    let claim_at = |d: &PushDue, now: DateTime<Utc>| {
        let (store, d) = (store.clone(), d.clone());
        async move {
            store
                .claim_push(&d.key_id, "switch-b", d.conn_id, now, claim_deadline(now))
                .await
                .unwrap()
        }
    };
    assert_eq!(claim_at(&due[0], later).await, PushClaim::Claimed);
    assert_eq!(claim_at(&due[1], later).await, PushClaim::RotationFull);
    assert_eq!(
        claim_at(&due[1], later + chrono::Duration::seconds(31)).await,
        PushClaim::Claimed
    );
}

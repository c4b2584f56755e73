//! Store stories: one set of scenarios run against SQLite (always) and PostgreSQL (when
//! `SWITCHYARD_TEST_DATABASE_URL` is set; required when `CI=true`).
//!
//! Each PostgreSQL test runs in its own freshly created schema, so the tests run in parallel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use switchyard_switch::domain::{
    KeyOwner, KeyState, KeyType, ResponseCode, TerminalId, WrappedKey,
};
use switchyard_switch::store::*;

#[path = "common/backends.rs"]
mod backends;
use backends::*;
stories!(
    terminals_register_conflict_and_page,
    key_lifecycle_allows_spec_transitions_only,
    racing_activations_leave_one_active_key,
    grace_window_accepts_previous_key_until_it_ends,
    fleet_rotation_of_ten_thousand_terminals,
    accounts_and_cards,
    three_wrong_pins_block_until_reset,
    pin_tries_are_reserved_atomically,
    concurrent_pin_tries_are_counted_one_after_another,
    authorize_applies_ledger_rules,
    concurrent_withdrawals_never_overdraw,
    concurrent_withdrawals_never_pass_the_daily_limit,
    a_stale_view_is_decided_again,
    the_view_reserves_a_pin_try,
    reversal_restores_funds_exactly_once,
    racing_reversals_credit_once,
    reversal_racing_its_original_nets_to_zero,
    audit_round_trip,
    idempotency_claims_commit_with_the_write,
    racing_idempotent_writes_apply_once,
    expired_idempotency_records_are_purged_in_chunks,
    migration_status_is_current_after_migrate,
    saf_delivers_fifo_within_priority,
    saf_enqueue_is_idempotent,
    saf_concurrent_leasers_never_share_a_message,
    saf_expired_lease_moves_to_another_drainer,
    saf_batch_completion_settles_only_what_the_holder_holds,
    saf_failures_back_off_exponentially,
    saf_poison_advice_dead_letters_and_the_rest_flow,
    saf_operator_retry_cancel_requeue,
    saf_stats_are_exact,
    stan_blocks_never_overlap_and_wrap,
    link_keys_round_trip_and_keep_the_newer,
    unbound_keys_are_found_and_rewrapped,
    stand_in_approval_queues_its_advice_in_the_same_transaction,
    issuer_answer_is_journaled_without_touching_the_ledger,
    forced_post_books_past_balance_and_limit,
    concurrent_forced_posts_never_pass_the_station_ceiling,
    concurrent_forced_posts_journal_the_balance_each_left,
    a_forced_post_that_debits_nothing_gives_its_ceiling_share_back,
);

// ---------------------------------------------------------------------------------------------
// helpers

fn tid(s: &str) -> TerminalId {
    TerminalId::new(s).unwrap()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap()
}

async fn terminal(store: &Store, id: &str) -> TerminalId {
    let t = NewTerminal {
        id: tid(id),
        group: "jakarta".into(),
        kind: TerminalKind::Atm,
    };
    store.create_terminal(&t, "admin").await.unwrap();
    t.id
}

fn new_key(terminal: &TerminalId, kt: KeyType, state: KeyState) -> NewKey {
    NewKey {
        terminal_id: terminal.clone(),
        key_type: kt,
        state,
        wrapped: WrappedKey::new(format!("WRAPPED-{}", uuid::Uuid::new_v4().simple())),
        kcv: "1A2B3C".into(),
        rotation_id: None,
        grace_seconds: 300,
    }
}

async fn account(store: &Store, id: &str, balance: i64, limit: i64) -> AccountId {
    let a = NewAccount {
        id: AccountId::new(id).unwrap(),
        currency: "360".into(),
        balance,
        daily_withdrawal_limit: limit,
    };
    store.create_account(&a, "admin").await.unwrap();
    a.id
}

fn identity(terminal: &str, stan: u32) -> RequestIdentity {
    RequestIdentity::new(tid(terminal), format!("{stan:06}"), "1122100000").unwrap()
}

fn withdrawal(acc: &AccountId, terminal: &str, stan: u32, amount: i64) -> AuthRequest {
    AuthRequest {
        identity: identity(terminal, stan),
        digest: format!("digest-{terminal}-{stan}-{amount}"),
        mti: "0200".into(),
        kind: AuthKind::Withdrawal { amount },
        card_id: None,
        account_id: Some(acc.clone()),
        currency: "360".into(),
        rrn: format!("{stan:012}"),
        auth_code: format!("A{stan:05}"),
        decline: None,
        now: t0(),
        advice: None,
        issuer_answer: None,
        force_post: false,
        force_post_ceiling: None,
        upstream_ref: None,
        pin_try: None,
        seen: None,
    }
}

fn reversal(terminal: &str, stan: u32, original: u32) -> ReversalRequest {
    ReversalRequest {
        identity: identity(terminal, stan),
        digest: format!("rev-{terminal}-{stan}-{original}"),
        mti: "0400".into(),
        original: identity(terminal, original),
        rrn: format!("{stan:012}"),
        now: t0(),
    }
}

/// A station's `0220` advice, force-posted under `ceiling`.
fn forced(
    acc: &AccountId,
    station: &str,
    stan: u32,
    amount: i64,
    ceiling: Option<ForcePostCeiling>,
) -> AuthRequest {
    AuthRequest {
        mti: "0220".into(),
        force_post: true,
        force_post_ceiling: ceiling,
        upstream_ref: None,
        ..withdrawal(acc, station, stan, amount)
    }
}

fn done(outcome: AuthOutcome) -> JournalEntry {
    match outcome {
        AuthOutcome::Done(e) => e,
        other => panic!("expected a processed request, got {other:?}"),
    }
}

async fn balance(store: &Store, acc: &AccountId) -> i64 {
    store.get_account(acc).await.unwrap().unwrap().balance
}

// ---------------------------------------------------------------------------------------------
// stories

async fn terminals_register_conflict_and_page(store: Store) {
    for (id, group) in [
        ("ATM00003", "bandung"),
        ("ATM00001", "jakarta"),
        ("ATM00005", "jakarta"),
        ("ATM00002", "bandung"),
        ("ATM00004", "surabaya"),
    ] {
        let t = NewTerminal {
            id: tid(id),
            group: group.into(),
            kind: TerminalKind::Atm,
        };
        let created = store.create_terminal(&t, "admin").await.unwrap();
        assert_eq!(created.id, t.id);
    }
    let station = NewTerminal {
        id: tid("ACQ001"),
        group: "stations".into(),
        kind: TerminalKind::Station,
    };
    store.create_terminal(&station, "admin").await.unwrap();

    let again = NewTerminal {
        id: tid("ATM00001"),
        group: "elsewhere".into(),
        kind: TerminalKind::Atm,
    };
    assert!(matches!(
        store.create_terminal(&again, "admin").await,
        Err(StoreError::Conflict { .. })
    ));
    let got = store.get_terminal(&tid("ATM00001")).await.unwrap().unwrap();
    assert_eq!(
        got.group, "jakarta",
        "a conflicting create must not overwrite"
    );
    assert_eq!(
        store
            .get_terminal(&tid("ACQ001"))
            .await
            .unwrap()
            .unwrap()
            .kind,
        TerminalKind::Station
    );
    assert!(store.get_terminal(&tid("NOPE")).await.unwrap().is_none());

    // keyset paging in id order
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_terminals(Page {
                after: after.clone(),
                limit: 2,
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = Some(page.last().unwrap().id.to_string());
        seen.extend(page.into_iter().map(|t| t.id.to_string()));
    }
    assert_eq!(
        seen,
        [
            "ACQ001", "ATM00001", "ATM00002", "ATM00003", "ATM00004", "ATM00005"
        ]
    );

    // fleet selectors leave stations out (their keys are the acquirer's to exchange); naming a
    // station by id still covers it
    let all = store.terminals_in(&TerminalSelector::All).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(!all.contains(&tid("ACQ001")));
    let ids = store
        .terminals_in(&TerminalSelector::Ids(vec![
            tid("ATM00004"),
            tid("GHOST"),
            tid("ATM00001"),
            tid("ATM00004"),
            tid("ACQ001"),
        ]))
        .await
        .unwrap();
    assert_eq!(ids, vec![tid("ACQ001"), tid("ATM00001"), tid("ATM00004")]);
    let groups = store
        .terminals_in(&TerminalSelector::Groups(vec![
            "bandung".into(),
            "surabaya".into(),
            "stations".into(),
        ]))
        .await
        .unwrap();
    assert_eq!(
        groups,
        vec![tid("ATM00002"), tid("ATM00003"), tid("ATM00004")]
    );

    // bulk onboarding is all or nothing
    let bulk: Vec<NewTerminal> = ["ATM00006", "ATM00001"]
        .iter()
        .map(|id| NewTerminal {
            id: tid(id),
            group: "medan".into(),
            kind: TerminalKind::Atm,
        })
        .collect();
    assert!(matches!(
        store.create_terminals_bulk(&bulk, "admin").await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(
        store
            .get_terminal(&tid("ATM00006"))
            .await
            .unwrap()
            .is_none()
    );

    let audit = store
        .list_audit(t0() - chrono::Duration::days(3650), 100)
        .await
        .unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.action == "terminal.create")
            .count(),
        6,
        "every registration is audited, the refused one is not"
    );
}

async fn key_lifecycle_allows_spec_transitions_only(store: Store) {
    let t = terminal(&store, "ATM1").await;
    let now = t0();
    let grace = Duration::from_secs(300);

    // TMK import: ACTIVE at once; a second import expires the first with the new key's grace
    let tmk1 = store
        .insert_key(&new_key(&t, KeyType::Tmk, KeyState::Active), "admin")
        .await
        .unwrap();
    assert_eq!((tmk1.version, tmk1.state), (1, KeyState::Active));
    assert!(tmk1.activated_at.is_some());
    let tmk2 = store
        .insert_key(&new_key(&t, KeyType::Tmk, KeyState::Active), "admin")
        .await
        .unwrap();
    assert_eq!(tmk2.version, 2);
    let tmk1 = store.get_key(&tmk1.id).await.unwrap().unwrap();
    assert_eq!(tmk1.state, KeyState::Expired);
    let g = tmk1.grace_until.unwrap() - tmk1.expired_at.unwrap();
    assert_eq!(g, chrono::Duration::seconds(300));

    // PENDING -> ACTIVE, then a new PENDING -> ACTIVE expires the previous with grace
    let k1 = store
        .insert_key(&new_key(&t, KeyType::Tpk, KeyState::Pending), "system")
        .await
        .unwrap();
    assert_eq!((k1.version, k1.state), (1, KeyState::Pending));
    let k1 = store
        .transition_key(&k1.id, KeyTransition::Activate, grace, "system", now)
        .await
        .unwrap();
    assert_eq!(k1.state, KeyState::Active);
    assert_eq!(k1.activated_at, Some(now));
    let k2 = store
        .insert_key(&new_key(&t, KeyType::Tpk, KeyState::Pending), "system")
        .await
        .unwrap();
    assert_eq!(k2.version, 2);
    let k2 = store
        .transition_key(&k2.id, KeyTransition::Activate, grace, "system", now)
        .await
        .unwrap();
    assert_eq!(k2.state, KeyState::Active);
    let k1 = store.get_key(&k1.id).await.unwrap().unwrap();
    assert_eq!(k1.state, KeyState::Expired);
    assert_eq!(k1.expired_at, Some(now));
    assert_eq!(k1.grace_until, Some(now + chrono::Duration::seconds(300)));

    // refused: ACTIVE -> ACTIVE, EXPIRED -> ACTIVE, EXPIRED -> EXPIRED
    for (id, to, from) in [
        (&k2.id, KeyTransition::Activate, KeyState::Active),
        (&k1.id, KeyTransition::Activate, KeyState::Expired),
        (&k1.id, KeyTransition::Expire, KeyState::Expired),
    ] {
        match store.transition_key(id, to, grace, "admin", now).await {
            Err(StoreError::InvalidTransition { from: f, to: t }) => {
                assert_eq!((f, t), (from, to.target()));
            }
            other => panic!("{to:?} from {from} must be refused, got {other:?}"),
        }
    }
    assert_eq!(
        store.get_key(&k1.id).await.unwrap().unwrap().state,
        KeyState::Expired
    );

    // ACTIVE -> EXPIRED keeps grace; PENDING -> EXPIRED gets none
    let k2 = store
        .transition_key(&k2.id, KeyTransition::Expire, grace, "admin", now)
        .await
        .unwrap();
    assert_eq!(k2.state, KeyState::Expired);
    assert_eq!(k2.grace_until, Some(now + chrono::Duration::seconds(300)));
    let k3 = store
        .insert_key(&new_key(&t, KeyType::Tpk, KeyState::Pending), "system")
        .await
        .unwrap();
    assert_eq!(k3.version, 3);
    let k3 = store
        .transition_key(&k3.id, KeyTransition::Expire, grace, "admin", now)
        .await
        .unwrap();
    assert_eq!((k3.state, k3.grace_until), (KeyState::Expired, None));

    // revoke from PENDING, ACTIVE and EXPIRED; never twice; a revoked key never comes back
    let p = store
        .insert_key(&new_key(&t, KeyType::Tak, KeyState::Pending), "system")
        .await
        .unwrap();
    let p = store
        .transition_key(&p.id, KeyTransition::Revoke, grace, "admin", now)
        .await
        .unwrap();
    assert_eq!(p.state, KeyState::Revoked);
    let a = store
        .insert_key(&new_key(&t, KeyType::Tak, KeyState::Pending), "system")
        .await
        .unwrap();
    store
        .transition_key(&a.id, KeyTransition::Activate, grace, "system", now)
        .await
        .unwrap();
    let a = store
        .transition_key(&a.id, KeyTransition::Revoke, grace, "admin", now)
        .await
        .unwrap();
    assert_eq!((a.state, a.grace_until), (KeyState::Revoked, None));
    let k1 = store
        .transition_key(&k1.id, KeyTransition::Revoke, grace, "admin", now)
        .await
        .unwrap();
    assert_eq!((k1.state, k1.grace_until), (KeyState::Revoked, None));
    for to in [
        KeyTransition::Activate,
        KeyTransition::Expire,
        KeyTransition::Revoke,
    ] {
        assert!(matches!(
            store.transition_key(&k1.id, to, grace, "admin", now).await,
            Err(StoreError::InvalidTransition {
                from: KeyState::Revoked,
                ..
            })
        ));
    }

    // refused input
    assert!(matches!(
        store
            .insert_key(
                &new_key(&tid("GHOST"), KeyType::Tpk, KeyState::Pending),
                "a"
            )
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store
            .insert_key(&new_key(&t, KeyType::Tpk, KeyState::Expired), "a")
            .await,
        Err(StoreError::Invalid { .. })
    ));
    assert!(matches!(
        store
            .transition_key(&KeyId::generate(), KeyTransition::Activate, grace, "a", now)
            .await,
        Err(StoreError::NotFound { .. })
    ));

    let keys = store.list_keys(&t).await.unwrap();
    assert_eq!(keys.len(), 2 + 3 + 2);
    assert!(
        !format!("{keys:?}").contains("WRAPPED-"),
        "Debug must not show wrapped keys"
    );
    let audit = store
        .list_audit(now - chrono::Duration::days(3650), 1000)
        .await
        .unwrap();
    let transitions = audit
        .iter()
        .filter(|a| a.action.starts_with("key.") && a.action != "key.create")
        .count();
    assert_eq!(
        transitions, 8,
        "one audit record per transition that happened"
    );
}

async fn racing_activations_leave_one_active_key(store: Store) {
    let t = terminal(&store, "ATM1").await;
    let grace = Duration::from_secs(60);
    let k = store
        .insert_key(&new_key(&t, KeyType::Tpk, KeyState::Pending), "s")
        .await
        .unwrap();

    // the same key activated by many callers at once: exactly one wins
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, id) = (Arc::clone(&store), k.id.clone());
        tasks.push(tokio::spawn(async move {
            store
                .transition_key(&id, KeyTransition::Activate, grace, "s", t0())
                .await
        }));
    }
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(key) => {
                won += 1;
                assert_eq!(key.state, KeyState::Active);
            }
            Err(StoreError::InvalidTransition {
                from: KeyState::Active,
                to: "ACTIVE",
            }) => {}
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(won, 1);

    // different pending keys of the same terminal and type activated at once
    let mut pending = Vec::new();
    for _ in 0..6 {
        pending.push(
            store
                .insert_key(&new_key(&t, KeyType::Tpk, KeyState::Pending), "s")
                .await
                .unwrap()
                .id,
        );
    }
    let mut tasks = Vec::new();
    for id in pending {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .transition_key(&id, KeyTransition::Activate, grace, "s", t0())
                .await
        }));
    }
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) | Err(StoreError::InvalidTransition { .. }) => {}
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    let keys = store.list_keys(&t).await.unwrap();
    assert_eq!(
        keys.iter().filter(|k| k.state == KeyState::Active).count(),
        1
    );
    assert_eq!(
        keys.iter().filter(|k| k.state == KeyState::Expired).count(),
        6
    );
    assert!(
        keys.iter()
            .filter(|k| k.state == KeyState::Expired)
            .all(|k| k.grace_until.is_some())
    );
}

async fn grace_window_accepts_previous_key_until_it_ends(store: Store) {
    let t = terminal(&store, "ATM1").await;
    let now = t0();
    let v1 = store
        .insert_key(&new_key(&t, KeyType::Tak, KeyState::Pending), "s")
        .await
        .unwrap();
    store
        .transition_key(&v1.id, KeyTransition::Activate, Duration::ZERO, "s", now)
        .await
        .unwrap();
    let v2 = store
        .insert_key(&new_key(&t, KeyType::Tak, KeyState::Pending), "s")
        .await
        .unwrap();

    let usable = store.keys_for_use(&t, KeyType::Tak, now).await.unwrap();
    assert_eq!(usable.active.as_ref().map(|k| &k.id), Some(&v1.id));
    assert_eq!(usable.pending.as_ref().map(|k| &k.id), Some(&v2.id));
    assert!(usable.in_grace.is_empty());

    store
        .transition_key(
            &v2.id,
            KeyTransition::Activate,
            Duration::from_secs(300),
            "s",
            now,
        )
        .await
        .unwrap();
    let inside = store
        .keys_for_use(&t, KeyType::Tak, now + chrono::Duration::seconds(299))
        .await
        .unwrap();
    assert_eq!(inside.active.as_ref().map(|k| &k.id), Some(&v2.id));
    assert!(inside.pending.is_none());
    assert_eq!(
        inside.in_grace.iter().map(|k| &k.id).collect::<Vec<_>>(),
        vec![&v1.id]
    );
    let at_end = store
        .keys_for_use(&t, KeyType::Tak, now + chrono::Duration::seconds(300))
        .await
        .unwrap();
    assert!(
        at_end.in_grace.is_empty(),
        "grace ends at graceUntil, never after"
    );

    // two replacements in a row: both previous keys in grace, newest first
    let v3 = store
        .insert_key(&new_key(&t, KeyType::Tak, KeyState::Pending), "s")
        .await
        .unwrap();
    store
        .transition_key(
            &v3.id,
            KeyTransition::Activate,
            Duration::from_secs(300),
            "s",
            now + chrono::Duration::seconds(10),
        )
        .await
        .unwrap();
    let both = store
        .keys_for_use(&t, KeyType::Tak, now + chrono::Duration::seconds(20))
        .await
        .unwrap();
    assert_eq!(
        both.in_grace.iter().map(|k| &k.id).collect::<Vec<_>>(),
        vec![&v2.id, &v1.id]
    );

    // a revoked key loses its grace at once; other key types are separate
    store
        .transition_key(&v2.id, KeyTransition::Revoke, Duration::ZERO, "admin", now)
        .await
        .unwrap();
    let after = store
        .keys_for_use(&t, KeyType::Tak, now + chrono::Duration::seconds(20))
        .await
        .unwrap();
    assert_eq!(
        after.in_grace.iter().map(|k| &k.id).collect::<Vec<_>>(),
        vec![&v1.id]
    );
    let tpk = store.keys_for_use(&t, KeyType::Tpk, now).await.unwrap();
    assert!(tpk.active.is_none() && tpk.pending.is_none() && tpk.in_grace.is_empty());
}

async fn fleet_rotation_of_ten_thousand_terminals(store: Store) {
    const FLEET: usize = 10_000;
    let terminals: Vec<NewTerminal> = (0..FLEET)
        .map(|i| NewTerminal {
            id: tid(&format!("T{i:06}")),
            group: if i % 2 == 0 { "even" } else { "odd" }.into(),
            kind: TerminalKind::Atm,
        })
        .collect();
    let started = Instant::now();
    assert_eq!(
        store
            .create_terminals_bulk(&terminals, "admin")
            .await
            .unwrap(),
        FLEET as u64
    );
    eprintln!(
        "{:?}: registered {FLEET} terminals in {:?}",
        store.backend(),
        started.elapsed()
    );

    // three terminals already have an ACTIVE TPK that the rotation will replace
    let now = t0();
    let mut old = Vec::new();
    for t in &terminals[..3] {
        old.push(
            store
                .insert_key(&new_key(&t.id, KeyType::Tpk, KeyState::Active), "s")
                .await
                .unwrap(),
        );
    }

    let ids = store.terminals_in(&TerminalSelector::All).await.unwrap();
    assert_eq!(ids.len(), FLEET);
    let rotation = NewRotation {
        id: RotationId::new("rot-1").unwrap(),
        key_type: KeyType::Tpk,
        activation: Activation::OnConfirm,
        grace_seconds: 300,
    };
    let keys: Vec<NewKey> = ids
        .iter()
        .map(|t| NewKey {
            rotation_id: Some(rotation.id.clone()),
            ..new_key(t, KeyType::Tpk, KeyState::Pending)
        })
        .collect();
    let started = Instant::now();
    store
        .insert_keys_bulk(&keys, &rotation, "operator")
        .await
        .unwrap();
    eprintln!(
        "{:?}: fleet rotation of {FLEET} PENDING keys committed in {:?}",
        store.backend(),
        started.elapsed()
    );

    let status = store.rotation_totals(&rotation.id).await.unwrap().unwrap();
    assert_eq!(status.terminals, FLEET as u64);
    assert_eq!(status.totals[&KeyState::Pending], FLEET as u64);
    assert_eq!(status.totals[&KeyState::Active], 0);
    assert_eq!(status.key_type, KeyType::Tpk);
    assert_eq!(status.activation, Activation::OnConfirm);
    let versions = store.list_keys(&terminals[0].id).await.unwrap();
    assert_eq!(
        versions.iter().map(|k| k.version).collect::<Vec<_>>(),
        vec![1, 2]
    );

    // the same rotation id again is refused and changes nothing
    assert!(matches!(
        store
            .insert_keys_bulk(&keys[..1], &rotation, "operator")
            .await,
        Err(StoreError::Conflict { .. })
    ));

    // confirm on the three terminals that had keys, plus one that had none
    for t in terminals[..4].iter() {
        let k = store
            .keys_for_use(&t.id, KeyType::Tpk, now)
            .await
            .unwrap()
            .pending
            .unwrap();
        assert_eq!(k.rotation_id.as_ref(), Some(&rotation.id));
        store
            .transition_key(
                &k.id,
                KeyTransition::Activate,
                Duration::from_secs(300),
                "s",
                now,
            )
            .await
            .unwrap();
    }
    let status = store.rotation_totals(&rotation.id).await.unwrap().unwrap();
    assert_eq!(status.totals[&KeyState::Active], 4);
    assert_eq!(status.totals[&KeyState::Pending], FLEET as u64 - 4);

    let in_grace = store
        .keys_for_use(&terminals[0].id, KeyType::Tpk, now)
        .await
        .unwrap();
    assert_eq!(in_grace.in_grace.len(), 1);
    let later = now + chrono::Duration::seconds(60);
    assert_eq!(
        store
            .expire_previous(&rotation.id, "operator", later)
            .await
            .unwrap(),
        3
    );
    for t in &terminals[..3] {
        let usable = store
            .keys_for_use(&t.id, KeyType::Tpk, later)
            .await
            .unwrap();
        assert!(
            usable.in_grace.is_empty(),
            "previous key of {} still in grace",
            t.id
        );
        assert!(usable.active.is_some());
    }
    assert_eq!(
        store
            .expire_previous(&rotation.id, "operator", later)
            .await
            .unwrap(),
        0
    );

    // unknown rotations and terminals
    let ghost = RotationId::new("rot-ghost").unwrap();
    assert!(store.rotation_totals(&ghost).await.unwrap().is_none());
    assert!(matches!(
        store.expire_previous(&ghost, "operator", later).await,
        Err(StoreError::NotFound { .. })
    ));
    let bad = NewRotation {
        id: RotationId::new("rot-2").unwrap(),
        ..rotation.clone()
    };
    let bad_keys = vec![
        new_key(&terminals[0].id, KeyType::Tpk, KeyState::Pending),
        new_key(&tid("GHOST"), KeyType::Tpk, KeyState::Pending),
    ];
    assert!(matches!(
        store.insert_keys_bulk(&bad_keys, &bad, "operator").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(
        store.rotation_totals(&bad.id).await.unwrap().is_none(),
        "all or nothing"
    );

    let audit = store
        .list_audit(now - chrono::Duration::days(3650), 1000)
        .await
        .unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.action == "rotation.create")
            .count(),
        1
    );
}

async fn accounts_and_cards(store: Store) {
    let acc = account(&store, "ACC-1", 500_000, 300_000).await;
    let got = store.get_account(&acc).await.unwrap().unwrap();
    assert_eq!(
        (
            got.currency.as_str(),
            got.balance,
            got.daily_withdrawal_limit
        ),
        ("360", 500_000, 300_000)
    );
    assert!(matches!(
        store
            .create_account(
                &NewAccount {
                    id: acc.clone(),
                    currency: "360".into(),
                    balance: 1,
                    daily_withdrawal_limit: 1
                },
                "a"
            )
            .await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(
        balance(&store, &acc).await,
        500_000,
        "conflict must not overwrite"
    );
    for (currency, bal, limit) in [("IDR", 0, 0), ("360", -1, 0), ("360", 0, -1)] {
        let bad = NewAccount {
            id: AccountId::new("ACC-BAD").unwrap(),
            currency: currency.into(),
            balance: bal,
            daily_withdrawal_limit: limit,
        };
        assert!(matches!(
            store.create_account(&bad, "a").await,
            Err(StoreError::Invalid { .. })
        ));
    }
    assert!(
        store
            .get_account(&AccountId::new("ACC-BAD").unwrap())
            .await
            .unwrap()
            .is_none()
    );

    let new_card = NewCard {
        pan_token: "a1b2c3d4e5f6".into(),
        last4: "0004".into(),
        expiry: "2812".into(),
        account_id: acc.clone(),
        pvv: "PVV-SECRET-1".into(),
        upstream: None,
    };
    let card = store.create_card(&new_card, "admin").await.unwrap();
    assert!(card.id.as_str().starts_with("card-"));
    assert_eq!((card.pin_tries, card.pin_blocked), (0, false));
    let by_id = store.get_card(&card.id).await.unwrap().unwrap();
    assert_eq!(by_id, card);
    assert_eq!(by_id.pvv, "PVV-SECRET-1");
    assert_eq!(
        store.find_card("a1b2c3d4e5f6").await.unwrap().unwrap().id,
        card.id
    );
    assert!(store.find_card("ffff").await.unwrap().is_none());
    assert!(!format!("{by_id:?}").contains("PVV-SECRET"));

    assert!(matches!(
        store.create_card(&new_card, "admin").await,
        Err(StoreError::Conflict { .. })
    ));
    let orphan = NewCard {
        pan_token: "0123".into(),
        account_id: AccountId::new("ACC-NONE").unwrap(),
        ..new_card.clone()
    };
    assert!(matches!(
        store.create_card(&orphan, "admin").await,
        Err(StoreError::NotFound { .. })
    ));
    let stand_in = NewCard {
        pan_token: "beef".into(),
        upstream: Some("issuer-b".into()),
        ..new_card
    };
    let stand_in = store.create_card(&stand_in, "admin").await.unwrap();
    assert_eq!(
        store
            .get_card(&stand_in.id)
            .await
            .unwrap()
            .unwrap()
            .upstream
            .as_deref(),
        Some("issuer-b")
    );

    let audit = store
        .list_audit(t0() - chrono::Duration::days(3650), 100)
        .await
        .unwrap();
    assert!(
        !format!("{audit:?}").contains("PVV-SECRET"),
        "audit must not carry the PVV"
    );
}

async fn pin_card(store: &Store, acc: &str, token: &str) -> Card {
    let acc = account(store, acc, 1000, 1000).await;
    store
        .create_card(
            &NewCard {
                pan_token: token.into(),
                last4: "1234".into(),
                expiry: "2812".into(),
                account_id: acc,
                pvv: "OLD".into(),
                upstream: None,
            },
            "admin",
        )
        .await
        .unwrap()
}

/// A balance inquiry whose PIN was checked against the card's PVV as `card` holds it.
fn pin_checked(card: &Card, stan: u32, correct: bool) -> AuthRequest {
    AuthRequest {
        kind: AuthKind::Balance,
        card_id: Some(card.id.clone()),
        decline: (!correct).then_some(ResponseCode::IncorrectPin),
        pin_try: Some(PinTry {
            card_id: card.id.clone(),
            correct,
            pvv: card.pvv.clone(),
        }),
        ..withdrawal(&card.account_id, "ATM00001", stan, 0)
    }
}

async fn tries(store: &Store, card: &Card) -> u32 {
    store.get_card(&card.id).await.unwrap().unwrap().pin_tries
}

async fn three_wrong_pins_block_until_reset(store: Store) {
    let card = pin_card(&store, "ACC-1", "abcd").await;
    // wrong, wrong, right: the right PIN ends the run
    for (stan, correct) in [(1, false), (2, false)] {
        let e = done(
            store
                .authorize(&pin_checked(&card, stan, correct))
                .await
                .unwrap(),
        );
        assert_eq!(e.response_code, "55");
    }
    assert_eq!(tries(&store, &card).await, 2);
    let e = done(store.authorize(&pin_checked(&card, 3, true)).await.unwrap());
    assert_eq!(e.response_code, "00");
    assert_eq!(tries(&store, &card).await, 0, "a good PIN ends the run");

    // three consecutive wrong PINs: 55, 55, 75 (journaled by the store), then 75 whatever the PIN
    let mut codes = Vec::new();
    for stan in 4..=6 {
        codes.push(
            done(
                store
                    .authorize(&pin_checked(&card, stan, false))
                    .await
                    .unwrap(),
            )
            .response_code,
        );
    }
    assert_eq!(codes, ["55", "55", "75"]);
    let blocked = store.get_card(&card.id).await.unwrap().unwrap();
    assert!(blocked.pin_blocked);
    let e = done(store.authorize(&pin_checked(&card, 7, true)).await.unwrap());
    assert_eq!(
        e.response_code, "75",
        "a blocked card stays blocked for the right PIN"
    );
    assert_eq!(tries(&store, &card).await, 3);

    store.reset_pin(&card.id, "NEW", "admin").await.unwrap();
    let reset = store.get_card(&card.id).await.unwrap().unwrap();
    assert_eq!(
        (reset.pin_tries, reset.pin_blocked, reset.pvv.as_str()),
        (0, false, "NEW")
    );
    // a PIN checked against the PVV before the reset says nothing about the new one
    assert!(matches!(
        store.authorize(&pin_checked(&card, 8, true)).await,
        Err(StoreError::Stale)
    ));
    assert!(
        store
            .find_request(&pin_checked(&card, 8, true).identity)
            .await
            .unwrap()
            .is_none()
    );
    let e = done(
        store
            .authorize(&pin_checked(&reset, 8, true))
            .await
            .unwrap(),
    );
    assert_eq!(e.response_code, "00");
    let ghost = CardId::new("card-ghost").unwrap();
    assert!(matches!(
        store.reset_pin(&ghost, "X", "admin").await,
        Err(StoreError::NotFound { .. })
    ));
    let mut lost = pin_checked(&reset, 9, false);
    lost.pin_try.as_mut().unwrap().card_id = ghost;
    assert!(matches!(
        store.authorize(&lost).await,
        Err(StoreError::NotFound { .. })
    ));
    // a wrong PIN must be declined 55: anything else is a caller bug, refused
    let mut confused = pin_checked(&reset, 10, false);
    confused.decline = None;
    assert!(matches!(
        store.authorize(&confused).await,
        Err(StoreError::Invalid { .. })
    ));
    let audit = store
        .list_audit(t0() - chrono::Duration::days(3650), 100)
        .await
        .unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.action == "card.pin-reset")
            .count(),
        1
    );
}

/// SPEC §4: a try is reserved before the PIN is checked, so concurrent requests never get more
/// than three between resets; a correct PIN resets only what is settled.
async fn pin_tries_are_reserved_atomically(store: Store) {
    let card = pin_card(&store, "ACC-1", "abcd").await;
    // 40 requests reserve at the same instant: exactly three get a try
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (store, id) = (Arc::clone(&store), card.id.clone());
        tasks.push(tokio::spawn(async move {
            store.reserve_pin_try(&id, t0()).await.unwrap()
        }));
    }
    let mut reserved = 0;
    for t in tasks {
        if t.await.unwrap() == PinReservation::Reserved {
            reserved += 1;
        }
    }
    assert_eq!(reserved, 3, "three tries, however many ask at once");
    assert_eq!(tries(&store, &card).await, 0, "nothing settled yet");

    // a released try (the request failed before its journal row) can be taken again
    store.release_pin_try(&card.id).await.unwrap();
    assert_eq!(
        store.reserve_pin_try(&card.id, t0()).await.unwrap(),
        PinReservation::Reserved
    );
    assert_eq!(
        store.reserve_pin_try(&card.id, t0()).await.unwrap(),
        PinReservation::InFlight
    );

    // the three in flight settle concurrently as wrong PINs: 55, 55, 75, never more
    let mut tasks = Vec::new();
    for stan in 1..=3 {
        let (store, req) = (Arc::clone(&store), pin_checked(&card, stan, false));
        tasks.push(tokio::spawn(async move {
            done(store.authorize(&req).await.unwrap()).response_code
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    codes.sort();
    assert_eq!(codes, ["55", "55", "75"]);
    assert_eq!(tries(&store, &card).await, 3);
    assert_eq!(
        store.reserve_pin_try(&card.id, t0()).await.unwrap(),
        PinReservation::Exhausted,
        "blocked"
    );
    store.reset_pin(&card.id, "NEW", "admin").await.unwrap();
    let card = store.get_card(&card.id).await.unwrap().unwrap();

    // a correct PIN does not wipe tries other requests reserved and are still checking
    let reserve = || store.reserve_pin_try(&card.id, t0());
    assert_eq!(reserve().await.unwrap(), PinReservation::Reserved); // wrong, in flight
    assert_eq!(reserve().await.unwrap(), PinReservation::Reserved); // right
    done(
        store
            .authorize(&pin_checked(&card, 10, true))
            .await
            .unwrap(),
    );
    assert_eq!(reserve().await.unwrap(), PinReservation::Reserved);
    assert_eq!(reserve().await.unwrap(), PinReservation::Reserved);
    assert_eq!(
        reserve().await.unwrap(),
        PinReservation::InFlight,
        "the one in flight still counts after the correct PIN"
    );
    for stan in 11..=13 {
        done(
            store
                .authorize(&pin_checked(&card, stan, false))
                .await
                .unwrap(),
        );
    }
    assert_eq!(tries(&store, &card).await, 3);

    // a duplicate gives its try back: the original already counted
    store.reset_pin(&card.id, "NEW", "admin").await.unwrap();
    let card = store.get_card(&card.id).await.unwrap().unwrap();
    assert_eq!(reserve().await.unwrap(), PinReservation::Reserved);
    done(
        store
            .authorize(&pin_checked(&card, 20, false))
            .await
            .unwrap(),
    );
    assert_eq!(reserve().await.unwrap(), PinReservation::Reserved);
    assert!(matches!(
        store
            .authorize(&pin_checked(&card, 20, false))
            .await
            .unwrap(),
        AuthOutcome::Duplicate(_)
    ));
    assert_eq!(tries(&store, &card).await, 1, "one wrong PIN, counted once");
    assert_eq!(reserve().await.unwrap(), PinReservation::Reserved);
    assert_eq!(reserve().await.unwrap(), PinReservation::Reserved);
    assert_eq!(reserve().await.unwrap(), PinReservation::InFlight);

    // tries a dead process reserved stop counting once they are stale
    let later = t0() + chrono::Duration::from_std(PIN_RESERVATION_TTL).unwrap();
    assert_eq!(
        store.reserve_pin_try(&card.id, later).await.unwrap(),
        PinReservation::InFlight,
        "not stale yet"
    );
    let stale = later + chrono::Duration::seconds(1);
    assert_eq!(
        store.reserve_pin_try(&card.id, stale).await.unwrap(),
        PinReservation::Reserved
    );
}

/// SPEC §4: concurrent requests for one card are counted one after another, each answered on
/// the count before it: however many PINs are checked at once, no more than three wrong ones
/// are answered between resets, and a retransmission is not counted twice.
async fn concurrent_pin_tries_are_counted_one_after_another(store: Store) {
    let card = pin_card(&store, "ACC-1", "abcd").await;
    // 40 wrong PINs at the same instant: 55, 55, 75, then 75 for the rest
    let mut tasks = Vec::new();
    for stan in 1..=40 {
        let (store, req) = (Arc::clone(&store), pin_checked(&card, stan, false));
        tasks.push(tokio::spawn(async move {
            done(store.authorize(&req).await.unwrap()).response_code
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|c| *c == "55").count(), 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| *c == "75").count(), 38, "{codes:?}");
    assert_eq!(tries(&store, &card).await, 3);

    // one wrong PIN left, and eight guesses at once, one of them right: whichever is counted
    // first decides, as if they had come one by one
    store.reset_pin(&card.id, "NEW", "admin").await.unwrap();
    let card = store.get_card(&card.id).await.unwrap().unwrap();
    for stan in 41..=42 {
        done(
            store
                .authorize(&pin_checked(&card, stan, false))
                .await
                .unwrap(),
        );
    }
    let mut tasks = Vec::new();
    for (i, stan) in (50..58).enumerate() {
        let (store, req) = (Arc::clone(&store), pin_checked(&card, stan, i == 3));
        tasks.push(tokio::spawn(async move {
            done(store.authorize(&req).await.unwrap()).response_code
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    let approved = codes.iter().filter(|c| *c == "00").count();
    let wrong = codes.iter().filter(|c| *c == "55").count();
    if approved == 1 {
        // the right PIN came first: the run restarts, two more wrong ones are 55, then 75s
        assert_eq!(wrong, 2, "{codes:?}");
    } else {
        // a wrong one came first: 75 for it and for everything after it, the right PIN too
        assert_eq!((approved, wrong), (0, 0), "{codes:?}");
        assert_eq!(codes[3], "75");
    }
    assert_eq!(tries(&store, &card).await, 3, "{codes:?}");

    // a retransmission gets its answer and is not counted again
    store.reset_pin(&card.id, "NEWER", "admin").await.unwrap();
    let card = store.get_card(&card.id).await.unwrap().unwrap();
    done(
        store
            .authorize(&pin_checked(&card, 60, false))
            .await
            .unwrap(),
    );
    assert!(matches!(
        store
            .authorize(&pin_checked(&card, 60, false))
            .await
            .unwrap(),
        AuthOutcome::Duplicate(_)
    ));
    assert_eq!(tries(&store, &card).await, 1, "one wrong PIN, counted once");
}

/// Concurrent withdrawals on one account never pass its daily limit (the day's total is part of
/// what each posting is decided on).
async fn concurrent_withdrawals_never_pass_the_daily_limit(store: Store) {
    // 30 withdrawals of 100 at once on a balance of 2,000 and a limit of 1,500: 15 approved
    let acc = account(&store, "ACC-2", 2_000, 1_500).await;
    let mut tasks = Vec::new();
    for stan in 100..130u32 {
        let (store, acc) = (Arc::clone(&store), acc.clone());
        tasks.push(tokio::spawn(async move {
            done(
                store
                    .authorize(&withdrawal(&acc, "ATM00002", stan, 100))
                    .await
                    .unwrap(),
            )
            .response_code
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|c| *c == "00").count(), 15, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| *c == "61").count(), 15, "{codes:?}");
    assert_eq!(balance(&store, &acc).await, 500);
}

/// The view reserves a PIN try in the same statement that reads it: three at most between
/// settlements, settled by the posting decided on it.
async fn the_view_reserves_a_pin_try(store: Store) {
    let card = pin_card(&store, "ACC-1", "abcd").await;
    let key = |stan: u32| ViewKey {
        identity: identity("ATM00001", stan),
        card: Some(CardLookup::PanToken(card.pan_token.clone())),
        account: None,
        station: None,
        day: switchyard_switch::store::utc_day(t0()),
        reserve_pin_at: Some(t0()),
    };
    let mut views = Vec::new();
    for stan in 1..=3 {
        let view = store.authorization_view(&key(stan)).await.unwrap();
        assert_eq!(view.pin_reservation(), Some(PinReservation::Reserved));
        assert_eq!(view.card().map(|c| &c.id), Some(&card.id));
        views.push(view);
    }
    let fourth = store.authorization_view(&key(4)).await.unwrap();
    assert_eq!(fourth.pin_reservation(), Some(PinReservation::InFlight));
    // the first settles as a right PIN on its view: one try free again for the fourth
    let first = views.remove(0);
    let e = done(
        store
            .authorize(&AuthRequest {
                seen: Some(first),
                ..pin_checked(&card, 1, true)
            })
            .await
            .unwrap(),
    );
    assert_eq!(e.response_code, "00");
    assert_eq!(
        store
            .authorization_view(&key(4))
            .await
            .unwrap()
            .pin_reservation(),
        Some(PinReservation::Reserved)
    );
    // unknown card: nothing reserved, nothing to say
    let ghost = ViewKey {
        card: Some(CardLookup::PanToken("no-such-token".into())),
        ..key(5)
    };
    let view = store.authorization_view(&ghost).await.unwrap();
    assert_eq!((view.card(), view.pin_reservation()), (None, None));
}

/// The caller's view is posted against when it still holds, and decided again when it does not.
async fn a_stale_view_is_decided_again(store: Store) {
    let acc = account(&store, "ACC-1", 10_000, 10_000).await;
    let first = withdrawal(&acc, "ATM00001", 1, 3_000);
    let key = ViewKey {
        identity: first.identity.clone(),
        card: None,
        account: Some(acc.clone()),
        station: None,
        day: switchyard_switch::store::utc_day(t0()),
        reserve_pin_at: None,
    };
    let view = store.authorization_view(&key).await.unwrap();
    assert!(view.answered().is_none() && view.card().is_none());
    // another withdrawal moves the balance after the view was read
    done(
        store
            .authorize(&withdrawal(&acc, "ATM00001", 2, 4_000))
            .await
            .unwrap(),
    );
    let e = done(
        store
            .authorize(&AuthRequest {
                seen: Some(view),
                ..first.clone()
            })
            .await
            .unwrap(),
    );
    assert_eq!(
        (e.response_code.as_str(), e.ledger_balance),
        ("00", Some(3_000)),
        "decided on the balance after the other withdrawal"
    );
    assert_eq!(balance(&store, &acc).await, 3_000);
    let again = store.authorization_view(&key).await.unwrap();
    assert_eq!(
        again.answered().map(|(_, e)| e.id.as_str()),
        Some(e.id.as_str())
    );
}

async fn authorize_applies_ledger_rules(store: Store) {
    let acc = account(&store, "ACC-1", 10_000, 5_000).await;

    let inquiry = AuthRequest {
        kind: AuthKind::Balance,
        digest: "bal".into(),
        ..withdrawal(&acc, "ATM1", 1, 0)
    };
    let e = done(store.authorize(&inquiry).await.unwrap());
    assert_eq!(
        (
            e.response_code.as_str(),
            e.ledger_balance,
            e.available_balance
        ),
        ("00", Some(10_000), Some(10_000))
    );
    assert_eq!(e.kind, JournalKind::Balance);

    let first = withdrawal(&acc, "ATM1", 2, 1_000);
    let e = done(store.authorize(&first).await.unwrap());
    assert_eq!(e.response_code, "00");
    assert_eq!(e.auth_code.as_deref(), Some("A00002"));
    assert_eq!(e.ledger_balance, Some(9_000));
    assert_eq!(balance(&store, &acc).await, 9_000);

    // the same request again: the same answer, no second debit
    match store.authorize(&first).await.unwrap() {
        AuthOutcome::Duplicate(d) => assert_eq!(d, e),
        other => panic!("expected duplicate, got {other:?}"),
    }
    assert_eq!(balance(&store, &acc).await, 9_000);
    // the same identity with other content: 94, nothing changed
    let altered = AuthRequest {
        kind: AuthKind::Withdrawal { amount: 2_000 },
        digest: "other".into(),
        ..first.clone()
    };
    assert_eq!(
        store.authorize(&altered).await.unwrap(),
        AuthOutcome::ContentMismatch
    );
    assert_eq!(balance(&store, &acc).await, 9_000);
    assert_eq!(
        store.find_request(&first.identity).await.unwrap().unwrap(),
        e
    );

    let zero = done(
        store
            .authorize(&withdrawal(&acc, "ATM1", 3, 0))
            .await
            .unwrap(),
    );
    assert_eq!(
        (zero.response_code.as_str(), zero.auth_code.as_deref()),
        ("13", None)
    );
    let negative = done(
        store
            .authorize(&withdrawal(&acc, "ATM1", 4, -50))
            .await
            .unwrap(),
    );
    assert_eq!(negative.response_code, "13");
    let over_limit = done(
        store
            .authorize(&withdrawal(&acc, "ATM1", 5, 4_001))
            .await
            .unwrap(),
    );
    assert_eq!(over_limit.response_code, "61");
    let up_to_limit = done(
        store
            .authorize(&withdrawal(&acc, "ATM1", 6, 4_000))
            .await
            .unwrap(),
    );
    assert_eq!(up_to_limit.response_code, "00");
    assert_eq!(balance(&store, &acc).await, 5_000);
    // the limit is per UTC day
    let tomorrow = AuthRequest {
        now: t0() + chrono::Duration::days(1),
        ..withdrawal(&acc, "ATM1", 7, 4_000)
    };
    assert_eq!(
        done(store.authorize(&tomorrow).await.unwrap()).response_code,
        "00"
    );
    assert_eq!(balance(&store, &acc).await, 1_000);

    let poor = account(&store, "ACC-2", 300, 10_000).await;
    let e = done(
        store
            .authorize(&withdrawal(&poor, "ATM1", 8, 500))
            .await
            .unwrap(),
    );
    assert_eq!(
        (
            e.response_code.as_str(),
            e.auth_code.as_deref(),
            e.ledger_balance
        ),
        ("51", None, None)
    );
    assert_eq!(balance(&store, &poor).await, 300);

    // a decline decided by the caller (wrong PIN) is journaled and changes nothing
    let wrong_pin = AuthRequest {
        decline: Some(ResponseCode::IncorrectPin),
        ..withdrawal(&poor, "ATM1", 9, 100)
    };
    let e = done(store.authorize(&wrong_pin).await.unwrap());
    assert_eq!(e.response_code, "55");
    assert_eq!(balance(&store, &poor).await, 300);
    assert_eq!(
        store
            .find_request(&wrong_pin.identity)
            .await
            .unwrap()
            .unwrap()
            .response_code,
        "55"
    );

    // no currency conversion: a foreign-currency withdrawal is refused
    let usd = AuthRequest {
        currency: "840".into(),
        ..withdrawal(&poor, "ATM1", 10, 100)
    };
    assert_eq!(
        done(store.authorize(&usd).await.unwrap()).response_code,
        "12"
    );
    assert_eq!(balance(&store, &poor).await, 300);

    let ghost = AuthRequest {
        account_id: Some(AccountId::new("ACC-NONE").unwrap()),
        ..withdrawal(&poor, "ATM1", 11, 100)
    };
    assert!(matches!(
        store.authorize(&ghost).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(
        store.find_request(&ghost.identity).await.unwrap().is_none(),
        "nothing half-written"
    );
}

async fn concurrent_withdrawals_never_overdraw(store: Store) {
    let acc = account(&store, "ACC-1", 3_000, 1_000_000).await;
    let mut tasks = Vec::new();
    for stan in 1..=50u32 {
        let store = Arc::clone(&store);
        let req = withdrawal(&acc, "ATM1", stan, 100);
        tasks.push(tokio::spawn(async move {
            done(store.authorize(&req).await.unwrap())
        }));
    }
    let mut approved = 0;
    let mut insufficient = 0;
    for t in tasks {
        match t.await.unwrap().response_code.as_str() {
            "00" => approved += 1,
            "51" => insufficient += 1,
            other => panic!("unexpected response {other}"),
        }
    }
    assert_eq!((approved, insufficient), (30, 20));
    assert_eq!(balance(&store, &acc).await, 0);

    // the same request sent 10 times at once: one debit
    let acc2 = account(&store, "ACC-2", 1_000, 1_000_000).await;
    let req = withdrawal(&acc2, "ATM2", 1, 100);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (store, req) = (Arc::clone(&store), req.clone());
        tasks.push(tokio::spawn(
            async move { store.authorize(&req).await.unwrap() },
        ));
    }
    let mut processed = 0;
    for t in tasks {
        match t.await.unwrap() {
            AuthOutcome::Done(e) => {
                processed += 1;
                assert_eq!(e.response_code, "00");
            }
            AuthOutcome::Duplicate(e) => assert_eq!(e.response_code, "00"),
            AuthOutcome::ContentMismatch => panic!("same content is not a mismatch"),
        }
    }
    assert_eq!(processed, 1);
    assert_eq!(balance(&store, &acc2).await, 900);
}

async fn reversal_restores_funds_exactly_once(store: Store) {
    let acc = account(&store, "ACC-1", 10_000, 5_000).await;
    done(
        store
            .authorize(&withdrawal(&acc, "ATM1", 1, 5_000))
            .await
            .unwrap(),
    );
    assert_eq!(balance(&store, &acc).await, 5_000);
    assert_eq!(
        done(
            store
                .authorize(&withdrawal(&acc, "ATM1", 2, 100))
                .await
                .unwrap()
        )
        .response_code,
        "61"
    );

    let rev = reversal("ATM1", 3, 1);
    let e = done(store.reverse(&rev).await.unwrap());
    assert_eq!(
        (e.response_code.as_str(), e.kind, e.amount),
        ("00", JournalKind::Reversal, Some(5_000))
    );
    assert_eq!(balance(&store, &acc).await, 10_000);
    assert!(
        store
            .find_request(&identity("ATM1", 1))
            .await
            .unwrap()
            .unwrap()
            .reversed
    );

    // the same reversal again (a 0421 repeat): the same answer, no second credit
    match store.reverse(&rev).await.unwrap() {
        AuthOutcome::Duplicate(d) => assert_eq!(d, e),
        other => panic!("expected duplicate, got {other:?}"),
    }
    // another reversal of the same original: approved, no second credit
    assert_eq!(
        done(store.reverse(&reversal("ATM1", 4, 1)).await.unwrap()).response_code,
        "00"
    );
    assert_eq!(balance(&store, &acc).await, 10_000);
    // mismatching content on a reversal identity
    let altered = ReversalRequest {
        digest: "altered".into(),
        ..rev.clone()
    };
    assert_eq!(
        store.reverse(&altered).await.unwrap(),
        AuthOutcome::ContentMismatch
    );

    // the reversed amount no longer counts against the daily limit
    assert_eq!(
        done(
            store
                .authorize(&withdrawal(&acc, "ATM1", 5, 5_000))
                .await
                .unwrap()
        )
        .response_code,
        "00"
    );
    assert_eq!(balance(&store, &acc).await, 5_000);

    // unknown original: 21, recorded, nothing changed
    let unknown = reversal("ATM1", 6, 999);
    let e = done(store.reverse(&unknown).await.unwrap());
    assert_eq!(e.response_code, "21");
    assert_eq!(
        store
            .find_request(&unknown.identity)
            .await
            .unwrap()
            .unwrap()
            .response_code,
        "21"
    );
    assert_eq!(balance(&store, &acc).await, 5_000);

    // a reversal of a reversal is not a thing
    let of_reversal = done(store.reverse(&reversal("ATM1", 7, 3)).await.unwrap());
    assert_eq!(of_reversal.response_code, "12");
    assert_eq!(balance(&store, &acc).await, 5_000);

    // a declined original or a balance inquiry: approved, nothing to restore
    let poor = account(&store, "ACC-2", 100, 5_000).await;
    assert_eq!(
        done(
            store
                .authorize(&withdrawal(&poor, "ATM2", 1, 500))
                .await
                .unwrap()
        )
        .response_code,
        "51"
    );
    assert_eq!(
        done(store.reverse(&reversal("ATM2", 2, 1)).await.unwrap()).response_code,
        "00"
    );
    let inquiry = AuthRequest {
        kind: AuthKind::Balance,
        ..withdrawal(&poor, "ATM2", 3, 0)
    };
    done(store.authorize(&inquiry).await.unwrap());
    assert_eq!(
        done(store.reverse(&reversal("ATM2", 4, 3)).await.unwrap()).response_code,
        "00"
    );
    assert_eq!(balance(&store, &poor).await, 100);
}

async fn racing_reversals_credit_once(store: Store) {
    let acc = account(&store, "ACC-1", 10_000, 10_000).await;
    done(
        store
            .authorize(&withdrawal(&acc, "ATM1", 1, 2_500))
            .await
            .unwrap(),
    );
    let mut tasks = Vec::new();
    for stan in 100..110u32 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            done(store.reverse(&reversal("ATM1", stan, 1)).await.unwrap())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().response_code, "00");
    }
    assert_eq!(balance(&store, &acc).await, 10_000, "exactly one credit");
}

/// An ATM that times out sends the reversal while (or before) the original is processed: in
/// every interleaving the pair must net to zero and the answers must agree.
async fn reversal_racing_its_original_nets_to_zero(store: Store) {
    let acc = account(&store, "ACC-1", 1_000_000, 1_000_000).await;
    let mut pairs = Vec::new();
    for stan in 1..=40u32 {
        let (s1, s2) = (Arc::clone(&store), Arc::clone(&store));
        let req = withdrawal(&acc, "ATM1", stan, 100);
        let auth = tokio::spawn(async move { done(s1.authorize(&req).await.unwrap()) });
        let rev = tokio::spawn(async move {
            done(
                s2.reverse(&reversal("ATM1", 1000 + stan, stan))
                    .await
                    .unwrap(),
            )
        });
        pairs.push((auth, rev));
    }
    let (mut restored, mut never_applied) = (0, 0);
    for (auth, rev) in pairs {
        let (auth, rev) = (auth.await.unwrap(), rev.await.unwrap());
        match (auth.response_code.as_str(), rev.response_code.as_str()) {
            ("00", "00") => restored += 1,
            ("21", "21") => {
                never_applied += 1;
                assert!(auth.reversed && auth.auth_code.is_none());
            }
            other => panic!("original and reversal disagree: {other:?}"),
        }
        assert!(
            store
                .find_request(&auth.identity)
                .await
                .unwrap()
                .unwrap()
                .reversed
        );
    }
    assert_eq!(restored + never_applied, 40);
    eprintln!(
        "{:?}: {restored} restored, {never_applied} reversed before arrival",
        store.backend()
    );
    assert_eq!(
        balance(&store, &acc).await,
        1_000_000,
        "every pair nets to zero"
    );

    // a late original after its reversal is never debited, and repeating it changes nothing
    let late = withdrawal(&acc, "ATM2", 1, 500);
    assert_eq!(
        done(store.reverse(&reversal("ATM2", 2, 1)).await.unwrap()).response_code,
        "21"
    );
    assert_eq!(
        done(store.authorize(&late).await.unwrap()).response_code,
        "21"
    );
    assert!(matches!(
        store.authorize(&late).await.unwrap(),
        AuthOutcome::Duplicate(_)
    ));
    assert_eq!(balance(&store, &acc).await, 1_000_000);
}

async fn audit_round_trip(store: Store) {
    let before = Utc::now() - chrono::Duration::seconds(1);
    for i in 0..3 {
        store
            .append_audit(&NewAudit {
                actor: "admin".into(),
                action: "saf.retry".into(),
                target: format!("saf-{i}"),
                result: "ok".into(),
                detail: serde_json::json!({"attempt": i, "destination": "issuer-b"}),
            })
            .await
            .unwrap();
    }
    let records = store.list_audit(before, 100).await.unwrap();
    assert_eq!(
        records
            .iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>(),
        ["saf-0", "saf-1", "saf-2"]
    );
    assert_eq!(records[1].detail["attempt"], 1);
    assert!(records.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(store.list_audit(before, 2).await.unwrap().len(), 2);
    assert!(
        store
            .list_audit(Utc::now() + chrono::Duration::hours(1), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

fn claim(key_mac: &str, request_mac: &str, claim_id: &str) -> IdempotencyClaim {
    IdempotencyClaim {
        key_mac: key_mac.into(),
        request_mac: request_mac.into(),
        claim_id: claim_id.into(),
    }
}

fn new_account(id: &str) -> NewAccount {
    NewAccount {
        id: AccountId::new(id).unwrap(),
        currency: "360".into(),
        balance: 100,
        daily_withdrawal_limit: 100,
    }
}

async fn account_exists(store: &Store, id: &str) -> bool {
    store
        .get_account(&AccountId::new(id).unwrap())
        .await
        .unwrap()
        .is_some()
}

/// An `Idempotency-Key` claim commits and rolls back with the audited write made under it.
async fn idempotency_claims_commit_with_the_write(store: Store) {
    assert!(store.idempotency_get("km-1").await.unwrap().is_none());
    // A write under a claim inserts the claim in its transaction.
    let a = claim("km-1", "rm-1", "attempt-a");
    with_claim(
        a.clone(),
        store.create_account(&new_account("IDEM-A"), "admin#1"),
    )
    .await
    .unwrap();
    let record = store.idempotency_get("km-1").await.unwrap().unwrap();
    assert_eq!(
        (record.request_mac.as_str(), record.claim_id.as_str()),
        ("rm-1", "attempt-a")
    );
    assert_eq!(record.answer, None, "claimed, not answered yet");
    // Another attempt of the same key: its transaction rolls back, its write is not applied.
    let b = claim("km-1", "rm-1", "attempt-b");
    let err = with_claim(
        b.clone(),
        store.create_account(&new_account("IDEM-B"), "admin#1"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::IdempotencyClaimed), "{err:?}");
    assert!(!account_exists(&store, "IDEM-B").await);
    // The claiming attempt's later writes go on (one request, several transactions).
    with_claim(
        a.clone(),
        store.create_account(&new_account("IDEM-A2"), "admin#1"),
    )
    .await
    .unwrap();
    let answer = StoredAnswer {
        status: 201,
        body: "{\"id\":\"IDEM-A\"}".into(),
    };
    assert!(store.idempotency_finish(&a, &answer).await.unwrap());
    assert!(
        !store.idempotency_finish(&b, &answer).await.unwrap(),
        "only the claiming attempt records the answer"
    );
    assert_eq!(
        store.idempotency_get("km-1").await.unwrap().unwrap().answer,
        Some(answer.clone())
    );
    // A write that fails leaves no claim behind.
    let c = claim("km-2", "rm-2", "attempt-c");
    let err = with_claim(
        c.clone(),
        store.create_account(&new_account("IDEM-A"), "admin#1"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert!(store.idempotency_get("km-2").await.unwrap().is_none());
    // A write without an audited change is claimed with its answer, afterwards.
    assert!(store.idempotency_finish(&c, &answer).await.unwrap());
    assert_eq!(
        store
            .idempotency_get("km-2")
            .await
            .unwrap()
            .unwrap()
            .claim_id,
        "attempt-c"
    );
    // Without a claim in scope nothing is claimed.
    store
        .create_account(&new_account("IDEM-PLAIN"), "admin#1")
        .await
        .unwrap();
    assert!(store.idempotency_get("km-3").await.unwrap().is_none());
}

/// Records older than the retention go, in bounded chunks; newer ones stay.
async fn expired_idempotency_records_are_purged_in_chunks(store: Store) {
    let answer = StoredAnswer {
        status: 201,
        body: "{}".into(),
    };
    for i in 0..3 {
        let c = claim(&format!("km-p{i}"), "rm", &format!("attempt-{i}"));
        assert!(store.idempotency_finish(&c, &answer).await.unwrap());
    }
    let now = Utc::now();
    // nothing is older than an hour ago
    let hour_ago = now - chrono::Duration::hours(1);
    assert_eq!(store.purge_idempotency(hour_ago, 1000).await.unwrap(), 0);
    assert!(store.idempotency_get("km-p0").await.unwrap().is_some());
    // everything is older than a second from now: one chunk of two, then the last one
    let later = now + chrono::Duration::seconds(1);
    assert_eq!(store.purge_idempotency(later, 2).await.unwrap(), 2);
    assert_eq!(store.purge_idempotency(later, 2).await.unwrap(), 1);
    assert_eq!(store.purge_idempotency(later, 2).await.unwrap(), 0);
    for i in 0..3 {
        assert!(
            store
                .idempotency_get(&format!("km-p{i}"))
                .await
                .unwrap()
                .is_none()
        );
    }
    // a purged key is free again: a retry after the retention runs as a new request
    let again = claim("km-p0", "rm-other", "attempt-new");
    assert!(store.idempotency_finish(&again, &answer).await.unwrap());
}

/// Many attempts of one request at the same instant: exactly one write is applied.
async fn racing_idempotent_writes_apply_once(store: Store) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let c = claim("km-race", "rm", &format!("attempt-{i}"));
            with_claim(
                c,
                store.create_account(&new_account(&format!("RACE-{i}")), "admin#1"),
            )
            .await
        }));
    }
    let mut applied = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(_) => {
                applied += 1;
                assert!(account_exists(&store, &format!("RACE-{i}")).await);
            }
            Err(StoreError::IdempotencyClaimed) => {
                assert!(!account_exists(&store, &format!("RACE-{i}")).await)
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(applied, 1);
}

async fn migration_status_is_current_after_migrate(store: Store) {
    let status = store.migration_status().await.unwrap();
    assert!(status.is_current(), "{status:?}");
    assert_eq!(status.applied, Some(status.expected));
    store.migrate().await.expect("migrating twice is a no-op");
    store.ping().await.unwrap();
    let stats = store.pool_stats();
    assert!(stats.size >= 1 && stats.idle <= stats.size);

    store.close().await;
    let err = store.ping().await.unwrap_err();
    assert!(
        err.is_unavailable(),
        "a closed store is unavailable: {err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// per-backend checks outside the shared stories

#[tokio::test]
async fn sqlite_unmigrated_status_and_scheme_errors() {
    let (store, guard) = open_sqlite(false).await;
    let status = store.migration_status().await.unwrap();
    assert_eq!(status.applied, None);
    assert!(status.pending >= 1 && !status.is_current());
    store.migrate().await.unwrap();
    assert!(store.migration_status().await.unwrap().is_current());
    guard.cleanup().await;

    match connect("mysql://u:secret@db/x", &ConnectOptions::default()).await {
        Err(e @ StoreError::Config { .. }) => assert!(!e.to_string().contains("secret")),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[tokio::test]
async fn sqlite_in_memory_store_works() {
    let store = connect("sqlite::memory:", &ConnectOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let acc = account(&store, "ACC-1", 1_000, 1_000).await;
    let e = done(
        store
            .authorize(&withdrawal(&acc, "ATM1", 1, 400))
            .await
            .unwrap(),
    );
    assert_eq!(e.response_code, "00");
    assert_eq!(balance(&store, &acc).await, 600);
}

#[tokio::test]
async fn postgres_unmigrated_status_and_debug_hides_password() {
    let Some((store, guard)) = open_postgres(false).await else {
        return;
    };
    let status = store.migration_status().await.unwrap();
    assert_eq!(status.applied, None);
    assert!(!status.is_current());
    store.migrate().await.unwrap();
    assert!(store.migration_status().await.unwrap().is_current());

    let url = std::env::var(PG_ENV).unwrap();
    let debug = format!("{store:?}");
    if let Some(password) = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, p)| p.to_string())
    {
        assert!(
            !debug.contains(&password),
            "Debug leaks the password: {debug}"
        );
    }
    guard.cleanup().await;
}

#[tokio::test]
async fn unreachable_postgres_reports_unavailable() {
    // nothing listens on port 1: every call fails fast as Unavailable, never a panic
    let opts = ConnectOptions {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(2),
    };
    let store = connect("postgres://sw:pw@127.0.0.1:1/switch", &opts)
        .await
        .unwrap();
    let err = store.ping().await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(!format!("{store:?}").contains("pw@"));
}

// ---------------------------------------------------------------------------------------------
// store-and-forward stories

const LEASE: Duration = Duration::from_secs(30);

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

fn advice(dest: &str, priority: u8, key: &str, created_at: DateTime<Utc>) -> NewAdvice {
    NewAdvice {
        destination: dest.into(),
        priority,
        mti: AdviceMti::Advice0220,
        idempotency_key: key.into(),
        payload: serde_json::json!({"2": "411111******1111", "4": "000000050000", "11": key}),
        reference: Some(format!("journal-{key}")),
        created_at,
    }
}

async fn enqueue(store: &Store, a: NewAdvice) -> AdviceId {
    match store.saf_enqueue(&a).await.unwrap() {
        EnqueueOutcome::Enqueued(id) => id,
        other => panic!("expected a new advice, got {other:?}"),
    }
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
    }
}

fn failure(reason: &str, permanent: bool) -> AdviceFailure {
    AdviceFailure {
        reason: reason.into(),
        permanent,
    }
}

fn keys_of(advices: &[Advice]) -> Vec<&str> {
    advices.iter().map(|a| a.idempotency_key.as_str()).collect()
}

async fn saf_delivers_fifo_within_priority(store: Store) {
    let t = t0();
    // enqueued out of order on purpose: priority first, then creation time
    enqueue(&store, advice("issuer-b", 1, "b-low-2", t - secs(10))).await;
    enqueue(&store, advice("issuer-b", 0, "b-high-2", t - secs(20))).await;
    enqueue(&store, advice("issuer-b", 1, "b-low-1", t - secs(50))).await;
    enqueue(&store, advice("issuer-b", 0, "b-high-1", t - secs(30))).await;
    enqueue(&store, advice("issuer-c", 0, "c-1", t - secs(40))).await;
    // not due yet: created in the future (clock skew between replicas)
    enqueue(&store, advice("issuer-b", 0, "b-later", t + secs(60))).await;

    // leases long enough to outlive this story
    let long = Duration::from_secs(3600);
    let b = store
        .saf_lease(Some("issuer-b"), "drainer-1", long, 10, t)
        .await
        .unwrap();
    assert_eq!(keys_of(&b), ["b-high-1", "b-high-2", "b-low-1", "b-low-2"]);
    assert!(
        b.iter()
            .all(|a| a.lease_holder.as_deref() == Some("drainer-1")
                && a.lease_until == Some(t + secs(3600))
                && a.attempts == 1
                && a.send_mti() == "0220")
    );
    assert_eq!(b[0].payload["11"], "b-high-1");
    assert_eq!(b[0].reference.as_deref(), Some("journal-b-high-1"));

    // any destination: only what is left and due
    let rest = store
        .saf_lease(None, "drainer-2", long, 10, t)
        .await
        .unwrap();
    assert_eq!(keys_of(&rest), ["c-1"]);
    let later = store
        .saf_lease(None, "drainer-2", LEASE, 10, t + secs(61))
        .await
        .unwrap();
    assert_eq!(keys_of(&later), ["b-later"]);

    // the limit is honoured and takes the head of the queue
    enqueue(&store, advice("issuer-d", 0, "d-1", t)).await;
    enqueue(&store, advice("issuer-d", 0, "d-2", t + secs(1))).await;
    let one = store
        .saf_lease(Some("issuer-d"), "drainer-3", LEASE, 1, t + secs(2))
        .await
        .unwrap();
    assert_eq!(keys_of(&one), ["d-1"]);
    assert!(
        store
            .saf_lease(Some("issuer-d"), "drainer-3", LEASE, 0, t + secs(2))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn saf_enqueue_is_idempotent(store: Store) {
    let t = t0();
    let first = enqueue(&store, advice("issuer-b", 0, "ACQ001:000123:1122153045", t)).await;
    // a retransmitted stand-in approval produces the same advice again
    let mut again = advice("issuer-b", 0, "ACQ001:000123:1122153045", t + secs(5));
    again.payload = serde_json::json!({"11": "different"});
    assert_eq!(
        store.saf_enqueue(&again).await.unwrap(),
        EnqueueOutcome::AlreadyQueued(first)
    );
    let all = store
        .saf_list(&SafFilter::default(), Page::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].payload["11"], "ACQ001:000123:1122153045");

    // still a duplicate once delivered: the issuer must not book it twice
    let leased = store
        .saf_lease(None, "drainer-1", LEASE, 10, t)
        .await
        .unwrap();
    store
        .saf_complete(leased[0].id, "drainer-1", t)
        .await
        .unwrap();
    assert_eq!(
        store.saf_enqueue(&again).await.unwrap(),
        EnqueueOutcome::AlreadyQueued(first)
    );
    assert!(
        store
            .saf_lease(None, "drainer-1", LEASE, 10, t + secs(60))
            .await
            .unwrap()
            .is_empty()
    );

    // bad input is refused with the field named
    let mut bad = advice("", 0, "k", t);
    let err = store.saf_enqueue(&bad).await.unwrap_err();
    assert!(err.to_string().contains("destination"), "{err}");
    bad = advice("issuer-b", 0, "k", t);
    bad.payload = serde_json::json!([1, 2]);
    let err = store.saf_enqueue(&bad).await.unwrap_err();
    assert!(err.to_string().contains("payload"), "{err}");
}

async fn saf_concurrent_leasers_never_share_a_message(store: Store) {
    let t = t0();
    for i in 0..60 {
        enqueue(
            &store,
            advice(
                ["issuer-b", "issuer-c"][i % 2],
                (i % 3) as u8,
                &format!("k{i:03}"),
                t - secs(i as i64),
            ),
        )
        .await;
    }
    let mut tasks = Vec::new();
    for d in 0..3 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let holder = format!("drainer-{d}");
            let mut got = Vec::new();
            loop {
                let batch = store
                    .saf_lease(None, &holder, LEASE, 4, t)
                    .await
                    .expect("lease");
                if batch.is_empty() {
                    return got;
                }
                for a in batch {
                    assert_eq!(a.lease_holder.as_deref(), Some(holder.as_str()));
                    got.push(a.id);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut all = Vec::new();
    let mut per_holder = Vec::new();
    for task in tasks {
        let got = task.await.unwrap();
        per_holder.push(got.len());
        all.extend(got);
    }
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        total,
        "an advice was leased twice: {per_holder:?}"
    );
    assert_eq!(total, 60);
    let stats = store.saf_stats(t).await.unwrap();
    assert_eq!(stats.in_flight, 60);
    // every advice's stored holder is the one that received it, and it was leased once
    let listed = store
        .saf_list(
            &SafFilter::default(),
            Page {
                after: None,
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert!(
        listed
            .iter()
            .all(|a| a.attempts == 1 && a.lease_holder.is_some())
    );
}

async fn saf_expired_lease_moves_to_another_drainer(store: Store) {
    let t = t0();
    let id = enqueue(&store, advice("issuer-b", 0, "k1", t)).await;
    let first = store
        .saf_lease(None, "drainer-1", LEASE, 10, t)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    // while the lease holds nobody else gets it
    assert!(
        store
            .saf_lease(None, "drainer-2", LEASE, 10, t + secs(29))
            .await
            .unwrap()
            .is_empty()
    );
    // drainer-1 died mid-send; after the lease ends drainer-2 takes over, as a repeat
    let second = store
        .saf_lease(None, "drainer-2", LEASE, 10, t + secs(30))
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, id);
    assert_eq!(second[0].attempts, 2);
    assert_eq!(second[0].send_mti(), "0221");

    // the old holder comes back: refused, nothing changed
    let err = store
        .saf_complete(id, "drainer-1", t + secs(31))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    assert!(err.to_string().contains("drainer-2"), "{err}");
    let err = store
        .saf_fail(
            id,
            "drainer-1",
            &failure("timeout", false),
            &policy(10),
            t + secs(31),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    let a = store.saf_get(id).await.unwrap().unwrap();
    assert_eq!(a.status, AdviceStatus::Queued);
    assert_eq!(a.lease_holder.as_deref(), Some("drainer-2"));
    assert_eq!(a.attempts, 2);

    store
        .saf_complete(id, "drainer-2", t + secs(32))
        .await
        .unwrap();
    let a = store.saf_get(id).await.unwrap().unwrap();
    assert_eq!(a.status, AdviceStatus::Delivered);
    assert_eq!(a.settled_at, Some(t + secs(32)));
    assert_eq!(a.lease_holder, None);
    // a second completion is refused too: the advice is settled
    let err = store
        .saf_complete(id, "drainer-2", t + secs(33))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    let err = store
        .saf_complete(AdviceId(999_999), "drainer-2", t)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
}

async fn saf_batch_completion_settles_only_what_the_holder_holds(store: Store) {
    let t = t0();
    let mut ids = Vec::new();
    for k in ["b1", "b2", "b3", "b4"] {
        ids.push(enqueue(&store, advice("issuer-b", 0, k, t)).await);
    }
    let leased = store
        .saf_lease(None, "drainer-1", LEASE, 3, t)
        .await
        .unwrap();
    assert_eq!(leased.len(), 3);
    // b4 is not leased by drainer-1; b3's lease ends and drainer-2 takes it
    let retaken = store
        .saf_lease(None, "drainer-2", LEASE, 10, t + secs(30))
        .await
        .unwrap();
    assert_eq!(retaken.len(), 4, "the three expired leases and b4");
    let settled = store
        .saf_complete_many(&ids[..2], "drainer-2", t + secs(31))
        .await
        .unwrap();
    assert_eq!(settled.len(), 2);
    // drainer-1 comes back with its whole batch: nothing of it is its own any more
    let settled = store
        .saf_complete_many(&ids, "drainer-1", t + secs(32))
        .await
        .unwrap();
    assert!(settled.is_empty(), "{settled:?}");
    let settled = store
        .saf_complete_many(&ids, "drainer-2", t + secs(33))
        .await
        .unwrap();
    assert_eq!(settled.len(), 2, "b1 and b2 were settled already");
    for id in &ids {
        let a = store.saf_get(*id).await.unwrap().unwrap();
        assert_eq!(a.status, AdviceStatus::Delivered);
        assert_eq!(a.lease_holder, None);
    }
    assert!(
        store
            .saf_complete_many(&[], "drainer-2", t)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn saf_failures_back_off_exponentially(store: Store) {
    let t = t0();
    let id = enqueue(&store, advice("issuer-b", 0, "k1", t)).await;
    let p = RetryPolicy {
        max_attempts: 20,
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(10),
    };
    let mut now = t;
    let mut delays = Vec::new();
    let mut mtis = Vec::new();
    for n in 1..=6u32 {
        let leased = store
            .saf_lease(None, "drainer-1", LEASE, 1, now)
            .await
            .unwrap();
        assert_eq!(leased.len(), 1, "attempt {n} not offered at {now}");
        assert_eq!(leased[0].attempts, n);
        mtis.push(leased[0].send_mti());
        let outcome = store
            .saf_fail(
                id,
                "drainer-1",
                &failure("response code 91", false),
                &p,
                now,
            )
            .await
            .unwrap();
        let FailOutcome::Retrying {
            attempts,
            next_attempt_at,
        } = outcome
        else {
            panic!("attempt {n}: expected a retry, got {outcome:?}");
        };
        assert_eq!(attempts, n);
        // not offered a moment before it is due
        assert!(
            store
                .saf_lease(
                    None,
                    "drainer-1",
                    LEASE,
                    1,
                    next_attempt_at - chrono::Duration::milliseconds(1)
                )
                .await
                .unwrap()
                .is_empty()
        );
        delays.push((next_attempt_at - now).num_seconds());
        now = next_attempt_at;
    }
    assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
    assert_eq!(mtis, ["0220", "0221", "0221", "0221", "0221", "0221"]);
    let a = store.saf_get(id).await.unwrap().unwrap();
    assert_eq!(a.last_error.as_deref(), Some("response code 91"));
    assert_eq!(a.lease_holder, None);
}

async fn saf_poison_advice_dead_letters_and_the_rest_flow(store: Store) {
    let t = t0();
    let poison = enqueue(&store, advice("issuer-b", 0, "poison", t - secs(10))).await;
    let refused = enqueue(&store, advice("issuer-b", 0, "refused", t - secs(9))).await;
    for i in 0..4 {
        enqueue(
            &store,
            advice("issuer-b", 0, &format!("good-{i}"), t - secs(5 - i)),
        )
        .await;
    }
    let p = policy(3);
    let mut now = t;
    let mut delivered = Vec::new();
    let mut dead = Vec::new();
    for _round in 0..10 {
        let batch = store
            .saf_lease(Some("issuer-b"), "drainer-1", LEASE, 2, now)
            .await
            .unwrap();
        for a in batch {
            if a.id == poison {
                let out = store
                    .saf_fail(a.id, "drainer-1", &failure("format error", false), &p, now)
                    .await
                    .unwrap();
                if matches!(out, FailOutcome::DeadLettered { .. }) {
                    dead.push((a.idempotency_key.clone(), out));
                }
            } else if a.id == refused {
                let out = store
                    .saf_fail(
                        a.id,
                        "drainer-1",
                        &failure("response code 12: invalid transaction", true),
                        &p,
                        now,
                    )
                    .await
                    .unwrap();
                dead.push((a.idempotency_key.clone(), out));
            } else {
                store.saf_complete(a.id, "drainer-1", now).await.unwrap();
                delivered.push(a.idempotency_key.clone());
            }
        }
        now += secs(5);
    }
    assert_eq!(delivered, ["good-0", "good-1", "good-2", "good-3"]);
    assert_eq!(
        dead,
        [
            (
                "refused".to_string(),
                FailOutcome::DeadLettered { attempts: 1 }
            ),
            (
                "poison".to_string(),
                FailOutcome::DeadLettered { attempts: 3 }
            ),
        ]
    );
    let letters = store
        .saf_list(
            &SafFilter {
                status: Some(AdviceStatus::DeadLetter),
                destination: Some("issuer-b".into()),
            },
            Page::default(),
        )
        .await
        .unwrap();
    assert_eq!(keys_of(&letters), ["poison", "refused"]);
    assert_eq!(letters[0].last_error.as_deref(), Some("format error"));
    assert_eq!(
        letters[1].last_error.as_deref(),
        Some("response code 12: invalid transaction")
    );
    // dead letters are not offered again
    assert!(
        store
            .saf_lease(None, "drainer-1", LEASE, 10, now + secs(3600))
            .await
            .unwrap()
            .is_empty()
    );
    let stats = store.saf_stats(now).await.unwrap();
    assert_eq!((stats.dead_letters, stats.delivered_total), (2, 4));
    assert!(stats.backlog.is_empty());
    let audit = store.list_audit(t - secs(3600), 100).await.unwrap();
    let dead_audits: Vec<&str> = audit
        .iter()
        .filter(|r| r.action == "saf.dead-letter")
        .map(|r| r.target.as_str())
        .collect();
    assert_eq!(dead_audits, [refused.to_string(), poison.to_string()]);
}

async fn saf_operator_retry_cancel_requeue(store: Store) {
    let t = t0();
    let p = policy(1);
    let a = enqueue(&store, advice("issuer-b", 0, "a", t)).await;
    let b = enqueue(&store, advice("issuer-b", 0, "b", t + secs(1))).await;
    let c = enqueue(&store, advice("issuer-b", 0, "c", t + secs(2))).await;

    // a: one attempt is the whole budget -> dead letter
    let leased = store
        .saf_lease(None, "drainer-1", LEASE, 1, t + secs(2))
        .await
        .unwrap();
    assert_eq!(leased[0].id, a);
    store
        .saf_fail(a, "drainer-1", &failure("timeout", false), &p, t + secs(2))
        .await
        .unwrap();
    assert_eq!(
        store.saf_get(a).await.unwrap().unwrap().status,
        AdviceStatus::DeadLetter
    );

    // requeue: due now, fresh budget, still sent as a repeat
    let err = store
        .saf_requeue_dead_letter(b, "ops", t + secs(3))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AdviceState { .. }), "{err:?}");
    let requeued = store
        .saf_requeue_dead_letter(a, "ops", t + secs(3))
        .await
        .unwrap();
    assert_eq!(requeued.status, AdviceStatus::Queued);
    assert_eq!(requeued.next_attempt_at, t + secs(3));
    assert_eq!(requeued.settled_at, None);
    let again = store
        .saf_lease(None, "drainer-1", LEASE, 1, t + secs(3))
        .await
        .unwrap();
    assert_eq!(again[0].id, a);
    assert_eq!(again[0].attempts, 2);
    assert_eq!(again[0].send_mti(), "0221");
    // the fresh budget (one attempt) is spent by this failure, not before it
    let out = store
        .saf_fail(a, "drainer-1", &failure("timeout", false), &p, t + secs(3))
        .await
        .unwrap();
    assert_eq!(out, FailOutcome::DeadLettered { attempts: 2 });

    // retry: a backing-off advice becomes due now
    let leased = store
        .saf_lease(None, "drainer-1", LEASE, 1, t + secs(4))
        .await
        .unwrap();
    assert_eq!(leased[0].id, b);
    let out = store
        .saf_fail(
            b,
            "drainer-1",
            &failure("timeout", false),
            &policy(5),
            t + secs(4),
        )
        .await
        .unwrap();
    assert!(matches!(out, FailOutcome::Retrying { .. }));
    let retried = store.saf_retry(b, "ops", t + secs(4)).await.unwrap();
    assert_eq!(retried.next_attempt_at, t + secs(4));

    // cancel: refused while a drainer is sending it, allowed once it is back in the queue
    let leased = store
        .saf_lease(None, "drainer-1", LEASE, 1, t + secs(4))
        .await
        .unwrap();
    assert_eq!(leased[0].id, b);
    let err = store.saf_cancel(b, "ops", t + secs(5)).await.unwrap_err();
    assert!(matches!(err, StoreError::AdviceState { .. }), "{err:?}");
    assert!(err.to_string().contains("drainer-1"), "{err}");
    store
        .saf_fail(
            b,
            "drainer-1",
            &failure("timeout", false),
            &policy(5),
            t + secs(5),
        )
        .await
        .unwrap();
    let cancelled = store.saf_cancel(b, "ops", t + secs(6)).await.unwrap();
    assert_eq!(cancelled.status, AdviceStatus::Cancelled);
    // a dead letter can be cancelled too
    assert_eq!(
        store
            .saf_cancel(a, "ops", t + secs(6))
            .await
            .unwrap()
            .status,
        AdviceStatus::Cancelled
    );
    // settled advices refuse every operator action
    let leased = store
        .saf_lease(None, "drainer-1", LEASE, 10, t + secs(60))
        .await
        .unwrap();
    assert_eq!(keys_of(&leased), ["c"], "cancelled advices are never sent");
    store
        .saf_complete(c, "drainer-1", t + secs(60))
        .await
        .unwrap();
    for err in [
        store.saf_retry(c, "ops", t + secs(61)).await.unwrap_err(),
        store.saf_cancel(c, "ops", t + secs(61)).await.unwrap_err(),
        store.saf_retry(b, "ops", t + secs(61)).await.unwrap_err(),
        store
            .saf_requeue_dead_letter(c, "ops", t + secs(61))
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::AdviceState { .. }), "{err:?}");
    }
    assert!(matches!(
        store
            .saf_retry(AdviceId(424_242), "ops", t)
            .await
            .unwrap_err(),
        StoreError::NotFound { .. }
    ));

    let audit = store.list_audit(t - secs(3600), 100).await.unwrap();
    let ops: Vec<(String, String)> = audit
        .iter()
        .filter(|r| r.actor == "ops")
        .map(|r| (r.action.clone(), r.target.clone()))
        .collect();
    assert_eq!(
        ops,
        [
            ("saf.requeue".to_string(), a.to_string()),
            ("saf.retry".to_string(), b.to_string()),
            ("saf.cancel".to_string(), b.to_string()),
            ("saf.cancel".to_string(), a.to_string()),
        ]
    );

    // paging by id, filtered
    let first = store
        .saf_list(
            &SafFilter::default(),
            Page {
                after: None,
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(keys_of(&first), ["a", "b"]);
    let next = store
        .saf_list(
            &SafFilter::default(),
            Page {
                after: Some(first[1].id.to_string()),
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(keys_of(&next), ["c"]);
    let cancelled = store
        .saf_list(
            &SafFilter {
                status: Some(AdviceStatus::Cancelled),
                destination: None,
            },
            Page::default(),
        )
        .await
        .unwrap();
    assert_eq!(keys_of(&cancelled), ["a", "b"]);
    let err = store
        .saf_list(
            &SafFilter::default(),
            Page {
                after: Some("x".into()),
                limit: 2,
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("after"), "{err}");
}

async fn saf_stats_are_exact(store: Store) {
    let t = t0();
    let empty = store.saf_stats(t).await.unwrap();
    assert_eq!(empty, SafStats::default());

    // issuer-b: 3 at priority 0, 2 at priority 1; issuer-c: 1 at priority 0
    for i in 0..3 {
        enqueue(
            &store,
            advice("issuer-b", 0, &format!("b0-{i}"), t - secs(100 - i)),
        )
        .await;
    }
    for i in 0..2 {
        enqueue(
            &store,
            advice("issuer-b", 1, &format!("b1-{i}"), t - secs(50 - i)),
        )
        .await;
    }
    let c = enqueue(&store, advice("issuer-c", 0, "c0-0", t - secs(400))).await;
    // lease the two oldest of issuer-b, deliver one
    let leased = store
        .saf_lease(Some("issuer-b"), "drainer-1", LEASE, 2, t)
        .await
        .unwrap();
    assert_eq!(keys_of(&leased), ["b0-0", "b0-1"]);
    store
        .saf_complete(leased[0].id, "drainer-1", t)
        .await
        .unwrap();
    // issuer-c's only advice is refused for good
    store
        .saf_lease(Some("issuer-c"), "drainer-1", LEASE, 1, t)
        .await
        .unwrap();
    store
        .saf_fail(
            c,
            "drainer-1",
            &failure("response code 30", true),
            &policy(10),
            t,
        )
        .await
        .unwrap();

    let stats = store.saf_stats(t + secs(10)).await.unwrap();
    assert_eq!(
        stats,
        SafStats {
            backlog: vec![
                SafBacklog {
                    destination: "issuer-b".into(),
                    priority: 0,
                    count: 2
                },
                SafBacklog {
                    destination: "issuer-b".into(),
                    priority: 1,
                    count: 2
                },
            ],
            in_flight: 1,
            // b0-1 was created at t - 99 s
            oldest_age_seconds: 109,
            dead_letters: 1,
            delivered_total: 1,
        }
    );
    // once the lease ends the advice is backlog but no longer in flight
    let later = store.saf_stats(t + secs(31)).await.unwrap();
    assert_eq!(later.in_flight, 0);
    assert_eq!(later.oldest_age_seconds, 130);
}

// ---------------------------------------------------------------------------------------------
// upstream routing: STANs, link keys, stand-in advices, issuer answers, forced posts

/// The i-th STAN of a block starting at `first`.
fn stan_of_block(first: u32, i: u32) -> u32 {
    (first - 1 + i) % 999_999 + 1
}

async fn stan_blocks_never_overlap_and_wrap(store: Store) {
    // a new station starts at 1
    assert_eq!(store.reserve_stans("ACQ001", 10).await.unwrap(), 1);
    assert_eq!(store.reserve_stans("ACQ001", 1).await.unwrap(), 11);
    assert_eq!(store.reserve_stans("ACQ002", 5).await.unwrap(), 1);
    for bad in [0, 100_001] {
        assert!(matches!(
            store.reserve_stans("ACQ001", bad).await,
            Err(StoreError::Invalid { .. })
        ));
    }

    // 8 processes × 50 reservations of 7 STANs each: every STAN handed out once
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut stans = Vec::new();
                for _ in 0..50 {
                    let first = store.reserve_stans("ACQ003", 7).await.unwrap();
                    stans.extend((0..7).map(|i| stan_of_block(first, i)));
                }
                stans
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=8 * 50 * 7).collect::<Vec<u32>>());

    // blocks wrap after 999,999 to 1 (000000 is never used)
    for i in 0..9 {
        assert_eq!(
            store.reserve_stans("ACQ004", 100_000).await.unwrap(),
            1 + i * 100_000
        );
    }
    assert_eq!(
        store.reserve_stans("ACQ004", 99_989).await.unwrap(),
        900_001
    );
    let first = store.reserve_stans("ACQ004", 20).await.unwrap();
    assert_eq!(first, 999_990);
    assert_eq!(stan_of_block(first, 9), 999_999);
    assert_eq!(stan_of_block(first, 10), 1);
    assert_eq!(store.reserve_stans("ACQ004", 1).await.unwrap(), 11);
}

async fn link_keys_round_trip_and_keep_the_newer(store: Store) {
    assert_eq!(store.link_keys("issuer-b").await.unwrap(), None);
    // read back, they carry the upstream they belong to (the HSM checks it)
    let issuer_b = || KeyOwner::Upstream("issuer-b".into());
    let keys = |tag: &str, at: DateTime<Utc>| LinkKeys {
        tpk: WrappedKey::owned_by(format!("TPK-{tag}"), issuer_b()),
        tak: WrappedKey::owned_by(format!("TAK-{tag}"), issuer_b()),
        exchanged_at: at,
    };
    let first = keys("1", t0());
    store.save_link_keys("issuer-b", &first).await.unwrap();
    assert_eq!(
        store.link_keys("issuer-b").await.unwrap(),
        Some(first.clone())
    );

    let newer = keys("2", t0() + secs(60));
    store.save_link_keys("issuer-b", &newer).await.unwrap();
    assert_eq!(
        store.link_keys("issuer-b").await.unwrap(),
        Some(newer.clone())
    );

    // a process that finished an older exchange late does not overwrite the newer pair
    store
        .save_link_keys("issuer-b", &keys("late", t0() + secs(30)))
        .await
        .unwrap();
    assert_eq!(store.link_keys("issuer-b").await.unwrap(), Some(newer));
    assert_eq!(store.link_keys("issuer-c").await.unwrap(), None);

    let empty = LinkKeys {
        tak: WrappedKey::new(String::new()),
        ..first.clone()
    };
    assert!(matches!(
        store.save_link_keys("issuer-c", &empty).await,
        Err(StoreError::Invalid { .. })
    ));
    // keys the HSM made for issuer-b are never stored as issuer-c's
    assert!(matches!(
        store.save_link_keys("issuer-c", &first).await,
        Err(StoreError::Invalid { .. })
    ));
    assert_eq!(store.link_keys("issuer-c").await.unwrap(), None);
}

/// Keys stored before keys were bound to their terminal are found and re-wrapped in place,
/// only while the row still holds what was read.
async fn unbound_keys_are_found_and_rewrapped(store: Store) {
    let t = terminal(&store, "ATM00001").await;
    // an LMK block of an earlier version: TR-31 header without optional blocks
    let legacy = |n: u32| format!("D0144M6AC00E0000{n:0>128}");
    let mut legacy_key = new_key(&t, KeyType::Tak, KeyState::Active);
    legacy_key.wrapped = WrappedKey::new(legacy(1));
    let old = store.insert_key(&legacy_key, "admin").await.unwrap();
    let mut bound_key = new_key(&t, KeyType::Tpk, KeyState::Active);
    bound_key.wrapped = WrappedKey::new(format!("D0176P0AB00E0200{:0>160}", "0BT"));
    store.insert_key(&bound_key, "admin").await.unwrap();

    let found = store.unbound_keys(None, 100).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, old.id);
    assert_eq!(
        found[0].wrapped.owner(),
        Some(&KeyOwner::Terminal(t.clone())),
        "the row's terminal comes with the block"
    );
    assert!(
        store
            .unbound_keys(Some(&old.id), 100)
            .await
            .unwrap()
            .is_empty()
    );

    let rebound = WrappedKey::new(format!("D0176M6AC00E0200{:0>160}", "0BT"));
    // a row that changed since it was read is left alone
    assert!(
        !store
            .rewrap_key(&old.id, &WrappedKey::new(legacy(2)), &rebound)
            .await
            .unwrap()
    );
    assert!(
        store
            .rewrap_key(&old.id, &old.wrapped, &rebound)
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_key(&old.id).await.unwrap().unwrap().wrapped.0,
        rebound.0
    );
    assert!(store.unbound_keys(None, 100).await.unwrap().is_empty());
    assert!(matches!(
        store
            .rewrap_key(&old.id, &rebound, &WrappedKey::new(""))
            .await,
        Err(StoreError::Invalid { .. })
    ));

    // a key the HSM made for one terminal is never stored as another's
    let mut foreign = new_key(&t, KeyType::Tpk, KeyState::Pending);
    foreign.wrapped = WrappedKey::owned_by("D0176P0AB", KeyOwner::Terminal(tid("ATM00002")));
    assert!(matches!(
        store.insert_key(&foreign, "admin").await,
        Err(StoreError::Invalid { .. })
    ));
}

fn stand_in_advice(key: &str) -> NewAdvice {
    NewAdvice {
        reference: None,
        ..advice("issuer-b", 0, key, t0())
    }
}

async fn queued_advices(store: &Store) -> Vec<Advice> {
    store
        .saf_list(&SafFilter::default(), Page::default())
        .await
        .unwrap()
}

async fn stand_in_approval_queues_its_advice_in_the_same_transaction(store: Store) {
    let acc = account(&store, "ACC-S", 10_000, 100_000).await;
    let stood_in = AuthRequest {
        advice: Some(stand_in_advice("ACQ001:000001:1122100000")),
        ..withdrawal(&acc, "ATM1", 1, 1_000)
    };
    let entry = done(store.authorize(&stood_in).await.unwrap());
    assert!(entry.approved());
    let queued = queued_advices(&store).await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].idempotency_key, "ACQ001:000001:1122100000");
    assert_eq!(queued[0].reference.as_deref(), Some(entry.id.as_str()));

    // the ATM's retransmission gets the same answer and queues nothing more
    let again = store.authorize(&stood_in).await.unwrap();
    assert_eq!(again, AuthOutcome::Duplicate(entry));
    assert_eq!(queued_advices(&store).await.len(), 1);

    // a decline never queues an advice, whether the caller or the ledger declined
    let wrong_pin = AuthRequest {
        decline: Some(ResponseCode::IncorrectPin),
        advice: Some(stand_in_advice("ACQ001:000002:1122100000")),
        ..withdrawal(&acc, "ATM1", 2, 1_000)
    };
    assert_eq!(
        done(store.authorize(&wrong_pin).await.unwrap()).response_code,
        "55"
    );
    let too_much = AuthRequest {
        advice: Some(stand_in_advice("ACQ001:000003:1122100000")),
        ..withdrawal(&acc, "ATM1", 3, 50_000)
    };
    assert_eq!(
        done(store.authorize(&too_much).await.unwrap()).response_code,
        "51"
    );
    assert_eq!(queued_advices(&store).await.len(), 1);

    // an advice already queued under its key (say, by an earlier attempt) is no error
    let requeued = AuthRequest {
        advice: Some(stand_in_advice("ACQ001:000001:1122100000")),
        ..withdrawal(&acc, "ATM1", 4, 1_000)
    };
    assert!(done(store.authorize(&requeued).await.unwrap()).approved());
    assert_eq!(queued_advices(&store).await.len(), 1);
    assert_eq!(balance(&store, &acc).await, 8_000);

    // an advice the queue refuses (it carries the PIN block) undoes the debit and the journal
    let mut payload = stand_in_advice("ACQ001:000005:1122100000");
    payload.payload["123"] = serde_json::json!("0123456789ABCDEF0123456789ABCDEF");
    let poisoned = AuthRequest {
        advice: Some(payload),
        ..withdrawal(&acc, "ATM1", 5, 1_000)
    };
    assert!(matches!(
        store.authorize(&poisoned).await,
        Err(StoreError::Invalid { .. })
    ));
    assert_eq!(balance(&store, &acc).await, 8_000);
    assert_eq!(store.find_request(&poisoned.identity).await.unwrap(), None);
    assert_eq!(queued_advices(&store).await.len(), 1);

    // stand-in, issuer answer and forced post exclude each other
    let confused = AuthRequest {
        advice: Some(stand_in_advice("ACQ001:000006:1122100000")),
        force_post: true,
        force_post_ceiling: None,
        upstream_ref: None,
        ..withdrawal(&acc, "ATM1", 6, 1_000)
    };
    assert!(matches!(
        store.authorize(&confused).await,
        Err(StoreError::Invalid { .. })
    ));
    assert_eq!(store.find_request(&confused.identity).await.unwrap(), None);
}

async fn issuer_answer_is_journaled_without_touching_the_ledger(store: Store) {
    let acc = account(&store, "ACC-I", 10_000, 100_000).await;
    let answered = AuthRequest {
        account_id: None,
        issuer_answer: Some(IssuerAnswer {
            response_code: ResponseCode::Approved,
            auth_code: Some("ISS123".into()),
            ledger_balance: Some(900_000),
            available_balance: Some(850_000),
        }),
        ..withdrawal(&acc, "ATM1", 1, 5_000)
    };
    let entry = done(store.authorize(&answered).await.unwrap());
    assert_eq!(
        (
            entry.response_code.as_str(),
            entry.auth_code.as_deref(),
            entry.ledger_balance,
            entry.available_balance,
            entry.amount
        ),
        (
            "00",
            Some("ISS123"),
            Some(900_000),
            Some(850_000),
            Some(5_000)
        )
    );
    assert_eq!(balance(&store, &acc).await, 10_000);
    assert_eq!(
        store.authorize(&answered).await.unwrap(),
        AuthOutcome::Duplicate(entry)
    );

    let declined = AuthRequest {
        issuer_answer: Some(IssuerAnswer {
            response_code: ResponseCode::InsufficientFunds,
            auth_code: None,
            ledger_balance: None,
            available_balance: None,
        }),
        ..answered.clone()
    };
    let declined = AuthRequest {
        identity: identity("ATM1", 2),
        ..declined
    };
    let entry = done(store.authorize(&declined).await.unwrap());
    assert_eq!(
        (
            entry.response_code.as_str(),
            entry.auth_code,
            entry.ledger_balance
        ),
        ("51", None, None)
    );
    // the same identity with other content is still `94`
    let altered = AuthRequest {
        digest: "other".into(),
        ..declined
    };
    assert_eq!(
        store.authorize(&altered).await.unwrap(),
        AuthOutcome::ContentMismatch
    );
    assert_eq!(balance(&store, &acc).await, 10_000);
}

async fn forced_post_books_past_balance_and_limit(store: Store) {
    let acc = account(&store, "ACC-F", 1_000, 2_000).await;
    let advice = |stan: u32, amount: i64| forced(&acc, "ACQ001", stan, amount, None);
    // past the balance: the acquirer already paid the cash out
    let e = done(store.authorize(&advice(1, 1_500)).await.unwrap());
    assert_eq!(
        (e.response_code.as_str(), e.ledger_balance),
        ("00", Some(-500))
    );
    assert_eq!(balance(&store, &acc).await, -500);
    // delivered again: booked once
    assert!(matches!(
        store.authorize(&advice(1, 1_500)).await.unwrap(),
        AuthOutcome::Duplicate(_)
    ));
    assert_eq!(balance(&store, &acc).await, -500);
    // past the daily limit too, and it counts toward the day's total
    assert!(done(store.authorize(&advice(2, 1_000)).await.unwrap()).approved());
    assert_eq!(balance(&store, &acc).await, -1_500);
    let ordinary = withdrawal(&acc, "ATM1", 3, 1);
    assert_eq!(
        done(store.authorize(&ordinary).await.unwrap()).response_code,
        "61"
    );

    // an ordinary withdrawal still never overdraws
    let other = account(&store, "ACC-G", 1_000, 100_000).await;
    let e = done(
        store
            .authorize(&withdrawal(&other, "ATM1", 4, 1_001))
            .await
            .unwrap(),
    );
    assert_eq!(e.response_code, "51");

    // nonsense amounts and currencies are still refused, and nothing is booked
    assert_eq!(
        done(store.authorize(&advice(5, 0)).await.unwrap()).response_code,
        "13"
    );
    let usd = AuthRequest {
        currency: "840".into(),
        ..advice(6, 100)
    };
    assert_eq!(
        done(store.authorize(&usd).await.unwrap()).response_code,
        "12"
    );
    assert_eq!(balance(&store, &acc).await, -1_500);

    // a reversal of a forced post restores it, as any withdrawal
    let rev = ReversalRequest {
        mti: "0420".into(),
        ..reversal("ACQ001", 7, 2)
    };
    assert!(done(store.reverse(&rev).await.unwrap()).approved());
    assert_eq!(balance(&store, &acc).await, -500);
}

async fn concurrent_forced_posts_never_pass_the_station_ceiling(store: Store) {
    let acc = account(&store, "ACC-C", 1_000, 2_000).await;
    let ceiling = ForcePostCeiling {
        per_advice: 10_000,
        per_day: 55_000,
    };
    let advice = |stan: u32, amount: i64| forced(&acc, "ACQ001", stan, amount, Some(ceiling));
    // above the per-advice ceiling: refused, nothing journaled
    let err = store.authorize(&advice(100, 10_001)).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::OverCeiling { what } if what.contains("per-advice")),
        "{err}"
    );
    assert_eq!(
        store.find_request(&identity("ACQ001", 100)).await.unwrap(),
        None
    );

    // twenty drainers deliver at once: five fit in the day, the rest are refused
    let tasks: Vec<_> = (1..=20)
        .map(|stan| {
            let store = store.clone();
            let req = advice(stan, 10_000);
            tokio::spawn(async move { store.authorize(&req).await })
        })
        .collect();
    let mut booked = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(outcome) => {
                assert!(done(outcome).approved());
                booked += 1;
            }
            Err(StoreError::OverCeiling { what }) => {
                assert!(what.contains("per-day"), "{what}");
                refused += 1;
            }
            Err(other) => panic!("unexpected: {other}"),
        }
    }
    assert_eq!((booked, refused), (5, 15));
    assert_eq!(balance(&store, &acc).await, 1_000 - 50_000);

    // a repeat of a booked advice still gets its answer; another station has its own day
    let mut first_booked = 0;
    for stan in 1..=20 {
        if store
            .find_request(&identity("ACQ001", stan))
            .await
            .unwrap()
            .is_some()
        {
            first_booked = stan;
            break;
        }
    }
    assert!(matches!(
        store
            .authorize(&advice(first_booked, 10_000))
            .await
            .unwrap(),
        AuthOutcome::Duplicate(_)
    ));
    let other = forced(&acc, "ACQ002", 1, 5_000, Some(ceiling));
    assert!(done(store.authorize(&other).await.unwrap()).approved());
    // the next UTC day starts afresh
    let tomorrow = AuthRequest {
        now: t0() + chrono::Duration::days(1),
        ..advice(50, 10_000)
    };
    assert!(done(store.authorize(&tomorrow).await.unwrap()).approved());
}

/// Forced posts to one account are applied relative to the balance as it is when each runs
/// (not decided again when another lands first), and each journal row records the balance its
/// own debit left: in commit order the recorded balances step down by exactly each amount.
async fn concurrent_forced_posts_journal_the_balance_each_left(store: Store) {
    let acc = account(&store, "ACC-R", 10_000, 1_000).await;
    let advice = |stan: u32, amount: i64| forced(&acc, "ACQ001", stan, amount, None);
    // distinct amounts, so each recorded balance says which debits came before it
    let amounts: Vec<i64> = (1..=24).map(|i| 100 * i).collect();
    let tasks: Vec<_> = amounts
        .iter()
        .enumerate()
        .map(|(i, amount)| {
            let store = store.clone();
            let req = advice(i as u32 + 1, *amount);
            tokio::spawn(async move { store.authorize(&req).await })
        })
        .collect();
    let mut answered = Vec::new();
    for t in tasks {
        let entry = done(t.await.unwrap().unwrap());
        assert!(entry.approved());
        assert_eq!(entry.ledger_balance, entry.available_balance);
        let journaled = store.find_request(&entry.identity).await.unwrap().unwrap();
        assert_eq!(journaled.ledger_balance, entry.ledger_balance);
        answered.push((entry.ledger_balance.unwrap(), entry.amount.unwrap()));
    }
    answered.sort_by_key(|a| std::cmp::Reverse(a.0));
    let mut expected = 10_000;
    for (recorded, amount) in &answered {
        expected -= amount;
        assert_eq!(*recorded, expected, "{answered:?}");
    }
    let total: i64 = amounts.iter().sum();
    assert_eq!(balance(&store, &acc).await, 10_000 - total);
    // every forced debit counted toward the day's total: an ordinary withdrawal is over it
    let ordinary = withdrawal(&acc, "ATM1", 99, 1);
    assert_eq!(
        done(store.authorize(&ordinary).await.unwrap()).response_code,
        "61"
    );
}

/// A forced post takes its share of the station's per-day ceiling before it is decided; a
/// duplicate, a decline, a reversed original and an error give it back, so only booked advices
/// count toward the day.
async fn a_forced_post_that_debits_nothing_gives_its_ceiling_share_back(store: Store) {
    let acc = account(&store, "ACC-S", 0, 0).await;
    let ceiling = ForcePostCeiling {
        per_advice: 10_000,
        per_day: 20_000,
    };
    let advice = |stan: u32, amount: i64| forced(&acc, "ACQ009", stan, amount, Some(ceiling));
    assert!(done(store.authorize(&advice(1, 10_000)).await.unwrap()).approved());
    // delivered again, twice: its share is already counted, and the repeats give theirs back
    for _ in 0..2 {
        assert!(matches!(
            store.authorize(&advice(1, 10_000)).await.unwrap(),
            AuthOutcome::Duplicate(_)
        ));
    }
    // a decline (another currency) gives its share back with its journal row
    let usd = AuthRequest {
        currency: "840".into(),
        ..advice(2, 10_000)
    };
    assert_eq!(
        done(store.authorize(&usd).await.unwrap()).response_code,
        "12"
    );
    // an advice whose reversal came first books nothing and gives its share back
    let rev = ReversalRequest {
        mti: "0420".into(),
        ..reversal("ACQ009", 30, 3)
    };
    store.reverse(&rev).await.unwrap();
    let reversed = done(store.authorize(&advice(3, 10_000)).await.unwrap());
    assert_eq!(reversed.response_code, "21");
    // an error (no such account) gives it back too
    let ghost = AuthRequest {
        account_id: Some(AccountId::new("ACC-NONE").unwrap()),
        ..advice(4, 10_000)
    };
    assert!(store.authorize(&ghost).await.is_err());
    // so the day still has room for exactly one more advice of 10,000
    assert!(done(store.authorize(&advice(5, 10_000)).await.unwrap()).approved());
    assert!(matches!(
        store.authorize(&advice(6, 1)).await.unwrap_err(),
        StoreError::OverCeiling { .. }
    ));
    // at the ceiling, a repeat of a booked advice is still answered as the duplicate it is
    assert!(matches!(
        store.authorize(&advice(5, 10_000)).await.unwrap(),
        AuthOutcome::Duplicate(_)
    ));
    assert_eq!(balance(&store, &acc).await, -20_000);
}

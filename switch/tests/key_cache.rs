//! The usable-key cache on both backends: every key-changing call through the caching store is
//! seen at once, a change made behind its back (another replica) at the latest when the TTL
//! ends, and grace windows end at `now` even for a cached entry.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use prometheus_client::metrics::counter::Counter;
use switchyard_switch::domain::{KeyState, KeyType, TerminalId, WrappedKey};
use switchyard_switch::store::{
    Activation, KeyCache, KeyCachingStore, KeyTransition, NewKey, NewRotation, NewTerminal,
    RotationId, Store, TerminalKind,
};

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

struct Fixture {
    /// The store as another replica holds it: changes here are not seen by the cache.
    behind: Store,
    /// The store as this process holds it.
    store: Store,
    cache: Arc<KeyCache>,
    hits: Counter,
    misses: Counter,
    tid: TerminalId,
}

impl Fixture {
    async fn new(db: &common::TestDb, ttl: Duration) -> Self {
        let behind = db.store().await;
        let (hits, misses) = (Counter::default(), Counter::default());
        let cache = Arc::new(KeyCache::new(ttl, hits.clone(), misses.clone()));
        let store: Store = Arc::new(KeyCachingStore::new(behind.clone(), cache.clone()));
        let tid = TerminalId::new("ATM00001").unwrap();
        store
            .create_terminal(
                &NewTerminal {
                    id: tid.clone(),
                    group: "g".into(),
                    kind: TerminalKind::Atm,
                },
                "test",
            )
            .await
            .unwrap();
        Self {
            behind,
            store,
            cache,
            hits,
            misses,
            tid,
        }
    }

    async fn tak(&self) -> Option<String> {
        let lookup = self
            .cache
            .usable(self.store.as_ref(), &self.tid, KeyType::Tak, Utc::now())
            .await
            .unwrap();
        lookup.keys.active.map(|k| k.id.to_string())
    }
}

async fn every_local_change_is_seen_at_once(backend: common::Backend) {
    let Some(db) = common::TestDb::new(backend).await else {
        return;
    };
    let fx = Fixture::new(&db, Duration::from_secs(3600)).await;
    assert_eq!(fx.tak().await, None);
    assert_eq!((fx.hits.get(), fx.misses.get()), (0, 1));
    assert_eq!(fx.tak().await, None);
    assert_eq!(
        fx.hits.get(),
        1,
        "the second lookup is served from the cache"
    );

    // insert_key
    let first = fx
        .store
        .insert_key(&new_key(&fx.tid, KeyType::Tak, KeyState::Active), "test")
        .await
        .unwrap();
    assert_eq!(fx.tak().await, Some(first.id.to_string()));

    // transition_key: activation of a PENDING key
    let second = fx
        .store
        .insert_key(&new_key(&fx.tid, KeyType::Tak, KeyState::Pending), "test")
        .await
        .unwrap();
    fx.tak().await;
    fx.store
        .transition_key(
            &second.id,
            KeyTransition::Activate,
            Duration::from_secs(300),
            "test",
            Utc::now(),
        )
        .await
        .unwrap();
    let lookup = fx
        .cache
        .usable(fx.store.as_ref(), &fx.tid, KeyType::Tak, Utc::now())
        .await
        .unwrap();
    assert_eq!(lookup.keys.active.map(|k| k.id), Some(second.id.clone()));
    assert_eq!(
        lookup
            .keys
            .in_grace
            .iter()
            .map(|k| &k.id)
            .collect::<Vec<_>>(),
        vec![&first.id],
        "the replaced key is in its grace"
    );

    // transition_key: revocation
    fx.tak().await;
    fx.store
        .transition_key(
            &second.id,
            KeyTransition::Revoke,
            Duration::ZERO,
            "test",
            Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(fx.tak().await, None);

    // insert_keys_bulk, then expire_previous
    let rotation = NewRotation {
        id: RotationId::generate(),
        key_type: KeyType::Tak,
        activation: Activation::OnConfirm,
        grace_seconds: 300,
    };
    let third = NewKey {
        rotation_id: Some(rotation.id.clone()),
        ..new_key(&fx.tid, KeyType::Tak, KeyState::Pending)
    };
    fx.tak().await;
    fx.store
        .insert_keys_bulk(std::slice::from_ref(&third), &rotation, "test")
        .await
        .unwrap();
    let pending = fx
        .cache
        .usable(fx.store.as_ref(), &fx.tid, KeyType::Tak, Utc::now())
        .await
        .unwrap()
        .keys
        .pending
        .expect("the rotation's key is seen at once");
    fx.store
        .transition_key(
            &pending.id,
            KeyTransition::Activate,
            Duration::from_secs(300),
            "test",
            Utc::now(),
        )
        .await
        .unwrap();
    fx.tak().await;
    let before = fx
        .cache
        .usable(fx.store.as_ref(), &fx.tid, KeyType::Tak, Utc::now())
        .await
        .unwrap();
    assert!(before.cached, "kept after the read");
    fx.store
        .expire_previous(&rotation.id, "test", Utc::now())
        .await
        .unwrap();
    let after = fx
        .cache
        .usable(fx.store.as_ref(), &fx.tid, KeyType::Tak, Utc::now())
        .await
        .unwrap();
    assert!(!after.cached, "expire_previous invalidated the cache");
    assert!(
        after.keys.in_grace.is_empty(),
        "no grace after expire_previous"
    );

    // rewrap_key
    let active = after.keys.active.unwrap();
    let rewrapped = WrappedKey::new("REWRAPPED".to_string());
    fx.tak().await;
    assert!(
        fx.store
            .rewrap_key(&active.id, &active.wrapped, &rewrapped)
            .await
            .unwrap()
    );
    let lookup = fx
        .cache
        .usable(fx.store.as_ref(), &fx.tid, KeyType::Tak, Utc::now())
        .await
        .unwrap();
    assert_eq!(lookup.keys.active.unwrap().wrapped.0, rewrapped.0);
    db.cleanup().await;
}
on_both_backends!(
    every_local_change_is_seen_at_once,
    every_local_change_is_seen_at_once
);

async fn a_change_behind_the_cache_is_seen_when_the_ttl_ends(backend: common::Backend) {
    let Some(db) = common::TestDb::new(backend).await else {
        return;
    };
    let fx = Fixture::new(&db, Duration::from_millis(300)).await;
    let key = fx
        .store
        .insert_key(&new_key(&fx.tid, KeyType::Tak, KeyState::Active), "test")
        .await
        .unwrap();
    assert_eq!(fx.tak().await, Some(key.id.to_string()));
    // another replica revokes it
    fx.behind
        .transition_key(
            &key.id,
            KeyTransition::Revoke,
            Duration::ZERO,
            "other-replica",
            Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(
        fx.tak().await,
        Some(key.id.to_string()),
        "served until the TTL ends"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(fx.tak().await, None, "not a moment past the TTL");

    // with the cache disabled every lookup reads the store
    let off = KeyCache::new(Duration::ZERO, Counter::default(), Counter::default());
    let lookup = off
        .usable(fx.behind.as_ref(), &fx.tid, KeyType::Tak, Utc::now())
        .await
        .unwrap();
    assert!(!lookup.cached);
    db.cleanup().await;
}
on_both_backends!(
    a_change_behind_the_cache_is_seen_when_the_ttl_ends,
    a_change_behind_the_cache_is_seen_when_the_ttl_ends
);

async fn a_grace_window_ends_at_now_even_when_cached(backend: common::Backend) {
    let Some(db) = common::TestDb::new(backend).await else {
        return;
    };
    let fx = Fixture::new(&db, Duration::from_secs(3600)).await;
    let old = fx
        .store
        .insert_key(&new_key(&fx.tid, KeyType::Tpk, KeyState::Active), "test")
        .await
        .unwrap();
    let new = fx
        .store
        .insert_key(&new_key(&fx.tid, KeyType::Tpk, KeyState::Pending), "test")
        .await
        .unwrap();
    let now = Utc::now();
    fx.store
        .transition_key(
            &new.id,
            KeyTransition::Activate,
            Duration::from_secs(60),
            "test",
            now,
        )
        .await
        .unwrap();
    let usable = |at| {
        let (cache, store, tid) = (fx.cache.clone(), fx.store.clone(), fx.tid.clone());
        async move {
            cache
                .usable(store.as_ref(), &tid, KeyType::Tpk, at)
                .await
                .unwrap()
        }
    };
    let within = usable(now + chrono::Duration::seconds(1)).await;
    assert_eq!(within.keys.in_grace.len(), 1);
    assert_eq!(within.keys.in_grace[0].id, old.id);
    // the same cached rows, asked about an instant after the grace ended
    let past = usable(now + chrono::Duration::seconds(61)).await;
    assert!(past.cached);
    assert!(
        past.keys.in_grace.is_empty(),
        "grace ends at now, not at the next read"
    );
    // and the store agrees
    let store_says = fx
        .behind
        .keys_for_use(&fx.tid, KeyType::Tpk, now + chrono::Duration::seconds(61))
        .await
        .unwrap();
    assert_eq!(store_says, past.keys);
    db.cleanup().await;
}
on_both_backends!(
    a_grace_window_ends_at_now_even_when_cached,
    a_grace_window_ends_at_now_even_when_cached
);

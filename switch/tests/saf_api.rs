//! The store-and-forward admin API on SQLite and PostgreSQL: list (PAN masked), stats (what the
//! operator scales drainers from), retry, cancel, dead-letter requeue, the documented refusals,
//! and the SAF gauges on `/metrics`.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{Backend, TestSwitch, sample};
use serde_json::json;
use switchyard_switch::store::{AdviceFailure, AdviceMti, NewAdvice, RetryPolicy};

fn advice(key: &str, destination: &str, priority: u8) -> NewAdvice {
    NewAdvice {
        destination: destination.into(),
        priority,
        mti: AdviceMti::Advice0220,
        idempotency_key: key.into(),
        payload: json!({"2": "4111111111111111", "3": "010000", "4": "000000010000", "11": "000001"}),
        reference: None,
        created_at: Utc::now(),
    }
}

async fn saf_admin(backend: Backend) {
    // the SAF gauges are recomputed in the background; often enough here to watch them move
    let Some(sw) = TestSwitch::start_with(backend, |s| {
        s.metrics.refresh_interval = Duration::from_millis(50);
    })
    .await
    else {
        return;
    };
    let store = sw.running.ctx.store.clone();
    for (i, dest) in ["issuer-b", "issuer-b", "issuer-c"].iter().enumerate() {
        store
            .saf_enqueue(&advice(&format!("ACQ001:{i}"), dest, 0))
            .await
            .unwrap();
    }
    let stats = sw.viewer.get("/v1/saf/stats").await.unwrap();
    assert_eq!(stats["backlog"], 3);
    assert_eq!(stats["inFlight"], 0);
    assert_eq!(stats["deadLetters"], 0);
    let list = sw.viewer.get("/v1/saf?destination=issuer-b").await.unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        list[0]["fields"]["2"], "411111******1111",
        "the API never shows a full PAN"
    );
    assert!(!list[0].to_string().contains("4111111111111111"));

    // A drainer leases one and it is refused for good: a dead letter with its reason.
    let leased = store
        .saf_lease(
            Some("issuer-c"),
            "drainer-1",
            Duration::from_secs(30),
            10,
            Utc::now(),
        )
        .await
        .unwrap();
    let dead = leased[0].id;
    assert!(
        !format!("{:?}", leased[0]).contains("4111111111111111"),
        "an advice's Debug never shows the PAN"
    );
    store
        .saf_fail(
            dead,
            "drainer-1",
            &AdviceFailure {
                reason: "issuer answered 12".into(),
                permanent: true,
            },
            &RetryPolicy::from(&sw.running.ctx.settings.saf),
            Utc::now(),
        )
        .await
        .unwrap();
    let dl = sw.viewer.get("/v1/saf?status=deadLetter").await.unwrap();
    assert_eq!(dl[0]["id"], dead.0);
    assert_eq!(dl[0]["lastError"], "issuer answered 12");
    let stats = sw.viewer.get("/v1/saf/stats").await.unwrap();
    assert_eq!(stats["deadLetters"], 1);
    assert_eq!(stats["backlog"], 2);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = sw.metrics().await;
        if sample(&text, "switchyard_saf_dead_letters") == Some(1.0)
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(sample(&text, "switchyard_saf_dead_letters"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "switchyard_saf_backlog{destination=\"issuer-b\",priority=\"0\"}"
        ),
        Some(2.0)
    );

    // Requeue the dead letter; retry and cancel a queued one.
    let requeued = sw
        .admin
        .post(
            &format!("/v1/saf/dead-letters/{}/requeue", dead.0),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(requeued["status"], "queued");
    let first = list[0]["id"].as_i64().unwrap();
    let retried = sw
        .admin
        .post(&format!("/v1/saf/{first}/retry"), &json!({}))
        .await
        .unwrap();
    assert_eq!(retried["status"], "queued");
    let cancelled = sw
        .admin
        .post(&format!("/v1/saf/{first}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled");

    // Refusals: requeue of something that is not a dead letter, cancel twice, unknown id, bad
    // id, a viewer writing — none changes anything.
    for (path, code) in [
        (format!("/v1/saf/dead-letters/{first}/requeue"), "409"),
        (format!("/v1/saf/{first}/retry"), "409"),
        ("/v1/saf/999999/cancel".to_string(), "404"),
        ("/v1/saf/abc/cancel".to_string(), "400"),
    ] {
        let err = sw.admin.post(&path, &json!({})).await.unwrap_err();
        assert!(err.to_string().contains(code), "{path}: {err}");
    }
    let err = sw
        .viewer
        .post(&format!("/v1/saf/{}/retry", dead.0), &json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let stats = sw.viewer.get("/v1/saf/stats").await.unwrap();
    assert_eq!(stats["backlog"], 2);
    assert_eq!(stats["deadLetters"], 0);
    let audit = sw.viewer.get("/v1/audit?limit=1000").await.unwrap();
    assert!(
        audit.as_array().unwrap().iter().any(|r| r["actor"]
            .as_str()
            .unwrap_or("")
            .starts_with("admin#")
            && r["action"].as_str().unwrap_or("").contains("cancel")),
        "{audit}"
    );
    sw.stop().await;
}
on_both_backends!(saf_admin_api, saf_admin);

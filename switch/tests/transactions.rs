//! Financial transactions and key lifecycle end to end (in-process switch, real sockets), on
//! SQLite and PostgreSQL: every response code of the profile, duplicates, reversals, concurrent
//! withdrawals, and every key transition through the wire and the admin API.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestSwitch, balance, card};
use serde_json::json;
use switchyard_switch::atm::session::{self, SessionOptions};
use switchyard_switch::atm::{AtmClient, expect_code};
use switchyard_switch::domain::{KeyType, TerminalId};

/// A signed-on terminal with TPK and TAK, and an account with a card.
async fn ready_atm(
    sw: &TestSwitch,
    tid: &str,
    account: &str,
    pan: &str,
    balance: i64,
    limit: i64,
) -> AtmClient {
    let mut atm = sw.atm(tid).await;
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    atm.exchange_key(KeyType::Tpk).await.unwrap();
    atm.exchange_key(KeyType::Tak).await.unwrap();
    sw.admin
        .create_account(account, "360", balance, limit)
        .await
        .unwrap();
    sw.admin
        .create_card(pan, "2812", account, "1234")
        .await
        .unwrap();
    atm
}

async fn full_demo_session(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut lines = Vec::new();
    session::run(
        SessionOptions {
            iso_addr: sw.iso(),
            admin: sw.admin.clone(),
            kek: sw.kek.clone(),
            terminal: TerminalId::new("ATM00001").unwrap(),
            card: card("6011000000000004"),
            account: "ACC-1".into(),
            provision_card: true,
            packager: sw.packager,
            tls: None,
        },
        |l| lines.push(l),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", lines.join("\n")));
    assert_eq!(balance(&sw, "ACC-1").await, 500_000, "withdrawal reversed");
    let keys = sw.viewer.get("/v1/terminals/ATM00001/keys").await.unwrap();
    let mut tak: Vec<_> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["type"] == "TAK")
        .map(|k| k["state"].as_str().unwrap().to_string())
        .collect();
    tak.sort();
    assert_eq!(tak, vec!["ACTIVE", "EXPIRED"], "{keys}");
    sw.stop().await;
}
on_both_backends!(
    full_session_with_server_initiated_rotation,
    full_demo_session
);

async fn response_codes(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut atm = ready_atm(
        &sw,
        "ATM00001",
        "ACC-1",
        "6011000000000004",
        100_000,
        60_000,
    )
    .await;
    let c = card("6011000000000004");
    let code = |m: switchyard_switch::iso8583::Message| m.get_str(39).unwrap().to_string();

    assert_eq!(code(atm.balance(&c).await.unwrap()), "00");
    assert_eq!(code(atm.withdraw(&c, 70_000).await.unwrap().1), "61");
    assert_eq!(code(atm.withdraw(&c, 0).await.unwrap().1), "13");
    assert_eq!(
        code(atm.balance(&card("6011999999999999")).await.unwrap()),
        "14"
    );
    assert_eq!(
        code(atm.balance(&card("4111111111111111")).await.unwrap()),
        "14"
    );
    let mut expired = c.clone();
    expired.expiry = "2001".into();
    assert_eq!(code(atm.balance(&expired).await.unwrap()), "54");
    let m = atm.financial("400000", &c, 0).unwrap();
    assert_eq!(code(atm.request(m, true).await.unwrap().0), "12");

    // 51 on a small account.
    sw.admin
        .create_account("ACC-2", "360", 1_000, 60_000)
        .await
        .unwrap();
    sw.admin
        .create_card("6011000000000012", "2812", "ACC-2", "1234")
        .await
        .unwrap();
    assert_eq!(
        code(
            atm.withdraw(&card("6011000000000012"), 5_000)
                .await
                .unwrap()
                .1
        ),
        "51"
    );

    // 63: MAC under a key the switch does not know; nothing changes.
    let m = atm.financial("010000", &c, 1_000).unwrap();
    let mut forged = m.clone();
    forged.set(64, vec![0u8; 8]);
    let bytes = sw.packager.pack(&forged).unwrap();
    let stan = forged.get_str(11).unwrap().to_string();
    assert_eq!(code(atm.exchange_raw(&bytes, &stan).await.unwrap().0), "63");
    assert_eq!(balance(&sw, "ACC-1").await, 100_000);

    // 94: same identity, different content.
    let (req, ans) = atm.withdraw(&c, 1_000).await.unwrap();
    assert_eq!(code(ans.clone()), "00");
    let mut changed = req.clone();
    changed.set_str(4, "000000002000");
    assert_eq!(code(atm.request(changed, true).await.unwrap().0), "94");
    // Duplicate: same answer, one debit.
    let again = atm.request(req.clone(), true).await.unwrap().0;
    assert_eq!(again.get_str(38), ans.get_str(38));
    assert_eq!(balance(&sw, "ACC-1").await, 99_000);

    // 21: reversal of an unknown original; 00 and restored once for the real one.
    let mut ghost = req.clone();
    ghost.set_str(11, "999999");
    assert_eq!(code(atm.reverse(&ghost).await.unwrap()), "21");
    assert_eq!(code(atm.reverse(&req).await.unwrap()), "00");
    assert_eq!(code(atm.reverse(&req).await.unwrap()), "00");
    assert_eq!(balance(&sw, "ACC-1").await, 100_000);

    // 55, 55, 75, and 75 even with the right PIN until reset.
    let mut wrong = c.clone();
    wrong.pin = "9999".into();
    let codes: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(code(atm.balance(&wrong).await.unwrap()));
        }
        v
    };
    assert_eq!(codes, ["55", "55", "75"]);
    assert_eq!(code(atm.balance(&c).await.unwrap()), "75");
    let cards = sw.viewer.get("/v1/audit").await.unwrap();
    assert!(cards.is_array());
    sw.stop().await;
}
on_both_backends!(every_response_code, response_codes);

async fn concurrent_withdrawals(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let sw = Arc::new(sw);
    sw.admin
        .create_account("HOT", "360", 3_000, 1_000_000)
        .await
        .unwrap();
    sw.admin
        .create_card("6011000000000020", "2812", "HOT", "1234")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..5 {
        let sw = sw.clone();
        let mut atm = sw.atm(&format!("CC{t:04}")).await;
        expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
        atm.exchange_key(KeyType::Tpk).await.unwrap();
        atm.exchange_key(KeyType::Tak).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let c = card("6011000000000020");
            let mut approved = 0;
            let mut insufficient = 0;
            for _ in 0..10 {
                match atm.withdraw(&c, 100).await.unwrap().1.get_str(39) {
                    Some("00") => approved += 1,
                    Some("51") => insufficient += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
            (approved, insufficient)
        }));
    }
    let mut approved = 0;
    let mut insufficient = 0;
    for t in tasks {
        let (a, i) = t.await.unwrap();
        approved += a;
        insufficient += i;
    }
    assert_eq!(approved, 30, "exactly the balance is paid out");
    assert_eq!(insufficient, 20);
    assert_eq!(balance(&sw, "HOT").await, 0, "no overdraft, no lost update");
    match Arc::try_unwrap(sw) {
        Ok(sw) => sw.stop().await,
        Err(_) => panic!("switch still shared"),
    }
}
on_both_backends!(
    concurrent_withdrawals_never_overdraw,
    concurrent_withdrawals
);

async fn key_lifecycle_through_the_api(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut atm = ready_atm(
        &sw,
        "ATM00001",
        "ACC-1",
        "6011000000000004",
        100_000,
        60_000,
    )
    .await;
    // Terminal offline: the new key waits PENDING and is pushed at the next sign-on.
    expect_code(&atm.network("002").await.unwrap(), "00").unwrap();
    let rotated = sw
        .admin
        .post("/v1/terminals/ATM00001/keys/TPK/rotate", &json!({}))
        .await
        .unwrap();
    assert_eq!(rotated["pushed"], false);
    let pending_id = rotated["key"]["id"].as_str().unwrap().to_string();
    assert_eq!(rotated["key"]["state"], "PENDING");
    // Rotating again re-delivers the same PENDING key instead of piling up keys.
    let again = sw
        .admin
        .post("/v1/terminals/ATM00001/keys/TPK/rotate", &json!({}))
        .await
        .unwrap();
    assert_eq!(again["key"]["id"], rotated["key"]["id"]);
    expect_code(&atm.network("001").await.unwrap(), "00").unwrap();
    assert_eq!(
        atm.wait_for_key_push(Duration::from_secs(5)).await.unwrap(),
        KeyType::Tpk
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let key = |id: &str, keys: &serde_json::Value| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .cloned()
            .unwrap()
    };
    let keys = sw.viewer.get("/v1/terminals/ATM00001/keys").await.unwrap();
    assert_eq!(key(&pending_id, &keys)["state"], "ACTIVE");
    assert!(
        expect_code(&atm.balance(&card("6011000000000004")).await.unwrap(), "00").is_ok(),
        "PIN block under the pushed TPK verifies"
    );
    // Revoke: immediate, no grace; a revoked key cannot be activated or expired.
    let revoked = sw
        .admin
        .post(&format!("/v1/keys/{pending_id}/revoke"), &json!({}))
        .await
        .unwrap();
    assert_eq!(revoked["state"], "REVOKED");
    assert!(revoked.get("graceUntil").is_none());
    for action in ["activate", "expire", "revoke"] {
        let err = sw
            .admin
            .post(&format!("/v1/keys/{pending_id}/{action}"), &json!({}))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("409"), "{action}: {err}");
    }
    // With the TPK revoked the PIN cannot verify: 55.
    assert_eq!(
        atm.balance(&card("6011000000000004"))
            .await
            .unwrap()
            .get_str(39),
        Some("55")
    );
    // Viewer may not write.
    let err = sw
        .viewer
        .post("/v1/terminals/ATM00001/keys/TAK/rotate", &json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    sw.stop().await;
}
on_both_backends!(key_lifecycle, key_lifecycle_through_the_api);

async fn fleet_rotation(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut live = ready_atm(
        &sw,
        "LIVE0001",
        "ACC-1",
        "6011000000000004",
        100_000,
        60_000,
    )
    .await;
    for i in 0..20 {
        let tid = TerminalId::new(format!("FL{i:04}")).unwrap();
        sw.admin
            .register_terminal(&sw.kek, &tid, "jakarta")
            .await
            .unwrap();
    }
    let created = sw
        .admin
        .post(
            "/v1/key-rotations",
            &json!({"keyType": "TAK", "terminals": "all", "activation": "onConfirm", "graceSeconds": 60}),
        )
        .await
        .unwrap();
    assert_eq!(created["terminals"], 21);
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        live.wait_for_key_push(Duration::from_secs(5))
            .await
            .unwrap(),
        KeyType::Tak
    );
    let mut totals = json!(null);
    for _ in 0..50 {
        totals = sw
            .viewer
            .get(&format!("/v1/key-rotations/{id}"))
            .await
            .unwrap()["totals"]
            .clone();
        if totals["ACTIVE"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        totals,
        json!({"PENDING": 20, "ACTIVE": 1, "EXPIRED": 0, "REVOKED": 0})
    );
    let res = sw
        .admin
        .post(
            &format!("/v1/key-rotations/{id}/expire-previous"),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(res["expired"], 1);
    // atTime: the switch activates the PENDING keys itself when the time comes, no
    // confirmation needed.
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(300)).to_rfc3339();
    let scheduled = sw
        .admin
        .post(
            "/v1/key-rotations",
            &json!({"keyType": "TPK", "terminals": {"groups": ["jakarta"]}, "activation": "atTime", "activateAt": at}),
        )
        .await
        .unwrap();
    assert_eq!(scheduled["terminals"], 20);
    let sid = scheduled["id"].as_str().unwrap().to_string();
    let mut totals = json!(null);
    for _ in 0..100 {
        totals = sw
            .viewer
            .get(&format!("/v1/key-rotations/{sid}"))
            .await
            .unwrap()["totals"]
            .clone();
        if totals["ACTIVE"] == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        totals,
        json!({"PENDING": 0, "ACTIVE": 20, "EXPIRED": 0, "REVOKED": 0})
    );
    // Groups select; an empty selection is refused.
    let err = sw
        .admin
        .post(
            "/v1/key-rotations",
            &json!({"keyType": "TPK", "terminals": {"groups": ["nowhere"]}, "activation": "onConfirm"}),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("422"), "{err}");
    sw.stop().await;
}
on_both_backends!(fleet_rotation_counts_and_pushes, fleet_rotation);

/// `maxConcurrent: 1`: the next terminal gets its push only once the previous one answered.
async fn paced_rotation(backend: Backend) {
    let Some(sw) = TestSwitch::start(backend).await else {
        return;
    };
    let mut atms = Vec::new();
    for i in 1..=3 {
        let mut atm = sw.atm(&format!("PACE000{i}")).await;
        assert_eq!(atm.network("001").await.unwrap().get_str(39), Some("00"));
        atms.push(atm);
    }
    let err = sw
        .admin
        .post(
            "/v1/key-rotations",
            &json!({"keyType": "TPK", "terminals": "all", "activation": "onConfirm", "maxConcurrent": 0}),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("maxConcurrent"), "{err}");
    let created = sw
        .admin
        .post(
            "/v1/key-rotations",
            &json!({"keyType": "TPK", "terminals": "all", "activation": "onConfirm", "maxConcurrent": 1}),
        )
        .await
        .unwrap();
    assert_eq!(created["terminals"], 3);
    // terminals are pushed in id order; while the first has not answered, nobody else is pushed
    for (n, waiting) in atms.iter_mut().enumerate().skip(1) {
        assert!(
            waiting
                .wait_for_key_push(Duration::from_millis(600))
                .await
                .is_err(),
            "PACE000{} was pushed before PACE0001 answered",
            n + 1
        );
    }
    for atm in atms.iter_mut() {
        assert_eq!(
            atm.wait_for_key_push(Duration::from_secs(5)).await.unwrap(),
            KeyType::Tpk
        );
    }
    // the last answer is processed after the ATM sent it
    let id = created["id"].as_str().unwrap();
    let mut totals = serde_json::Value::Null;
    for _ in 0..50 {
        totals = sw
            .admin
            .get(&format!("/v1/key-rotations/{id}"))
            .await
            .unwrap();
        if totals["totals"]["ACTIVE"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(totals["totals"]["ACTIVE"], 3, "{totals}");
    sw.stop().await;
}

on_both_backends!(rotation_with_max_concurrent_paces_pushes, paced_rotation);

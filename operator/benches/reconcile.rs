//! Reconcile CPU cost without I/O: validate + build every object + compare with what the
//! cluster holds (the steady-state skip check), for the two fixture specs.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;
use switchyard_operator::bank_switch::apply::{desired_hash, is_subset};
use switchyard_operator::bank_switch::build::{BuildInputs, build_all};
use switchyard_operator::bank_switch::validate::validate;
use switchyard_operator::crd::BankSwitch;

fn observed_like_the_server(desired: &Value) -> Value {
    // The server adds defaults and status; the skip check must see through them.
    let mut v = desired.clone();
    v["metadata"]["resourceVersion"] = Value::from("12345");
    v["metadata"]["uid"] = Value::from("0000");
    v["status"] = serde_json::json!({"observedGeneration": 3});
    v
}

fn bench(c: &mut Criterion) {
    for (label, text) in [
        (
            "embedded-minimal",
            include_str!("../tests/fixtures/embedded-minimal.yaml"),
        ),
        (
            "postgres-full",
            include_str!("../tests/fixtures/postgres-full.yaml"),
        ),
    ] {
        let bs: BankSwitch = serde_yaml::from_str(text).expect("fixture parses");
        let inputs = BuildInputs {
            drainer_replicas: 2,
            monitoring_api_served: true,
            operator_namespace: "switchyard-system".into(),
        };
        let objects = build_all(&validate(&bs).expect("valid"), inputs.clone()).expect("builds");
        let observed: Vec<Value> = objects
            .to_values()
            .expect("values")
            .iter()
            .map(observed_like_the_server)
            .collect();
        eprintln!("{label}: {} objects per reconcile", observed.len());

        c.bench_function(&format!("{label}/validate+build"), |b| {
            b.iter(|| {
                build_all(&validate(black_box(&bs)).expect("valid"), inputs.clone())
                    .expect("builds")
            })
        });
        c.bench_function(&format!("{label}/validate+build+diff"), |b| {
            b.iter(|| {
                let objects = build_all(&validate(black_box(&bs)).expect("valid"), inputs.clone())
                    .expect("builds");
                let values = objects.to_values().expect("values");
                values
                    .iter()
                    .zip(&observed)
                    .filter(|(d, o)| {
                        let _ = desired_hash(d);
                        is_subset(d, o)
                    })
                    .count()
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

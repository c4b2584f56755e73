//! Cost of the per-transaction HSM operations through `SoftHsm`, LMK unwrap of the working key
//! included: the MAC on a ~200-byte ISO 8583 message (generate and verify) and a PIN verification.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard_switch::crypto::{
    ClearPin, Hsm, Kek, KeyCheckValue, KeyType, Lmk, SoftHsm, TerminalKeys,
};
use switchyard_switch::domain::{KeyOwner, TerminalId};

fn bench_hsm(c: &mut Criterion) {
    let kek_hex = "89E88CF7931444F334BD7547FC3F380C";
    let hsm = SoftHsm::new(
        Lmk::generate(&mut rand::rng()),
        Some(Kek::from_hex(kek_hex).expect("KEK")),
    );
    let mut atm = TerminalKeys::generate(&mut rand::rng());
    let owner = KeyOwner::Terminal(TerminalId::new("ATM00001").expect("terminal id"));
    let (block, kcv) = atm
        .wrap_tmk_under_kek(&Kek::from_hex(kek_hex).expect("KEK"))
        .expect("wrap TMK");
    let (tmk, _) = hsm
        .import_under_kek(KeyType::Tmk, &owner, &block, &kcv)
        .expect("import TMK");
    let mut deliver = |kt: KeyType| {
        let (key, kcv): (_, KeyCheckValue) = hsm.generate_key(kt, &owner).expect("generate");
        let field120 = hsm.export_under_tmk(&tmk, &key, kt).expect("export");
        atm.accept_key_block(kt, &field120, &kcv).expect("accept");
        key
    };
    let tak = deliver(KeyType::Tak);
    let tpk = deliver(KeyType::Tpk);

    // A 200-byte stand-in for a packed 0200 up to field 64.
    let message: Vec<u8> = (0..200u8).map(|i| b'0' + i % 10).collect();
    let mac = atm.mac(&message).expect("mac");

    let pan = "6011000000000004";
    let pin = ClearPin::new("1234").expect("pin");
    let pvv = hsm.make_pvv(pan, &pin).expect("pvv");
    let pin_block = atm.encipher_pin(pan, &pin).expect("pin block");

    c.bench_function("hsm_generate_mac_200B", |b| {
        b.iter(|| hsm.generate_mac(black_box(&tak), black_box(&message)))
    });
    c.bench_function("hsm_verify_mac_200B", |b| {
        b.iter(|| hsm.verify_mac(black_box(&tak), black_box(&message), black_box(&mac)))
    });
    c.bench_function("hsm_verify_pin", |b| {
        b.iter(|| hsm.verify_pin(black_box(&tpk), pan, black_box(&pin_block), &pvv))
    });
    c.bench_function("hsm_kcv_lmk_unwrap_only", |b| {
        b.iter(|| hsm.kcv(black_box(&tak)))
    });
    c.bench_function("terminal_mac_200B_no_unwrap", |b| {
        b.iter(|| atm.mac(black_box(&message)))
    });
}

criterion_group!(benches, bench_hsm);
criterion_main!(benches);

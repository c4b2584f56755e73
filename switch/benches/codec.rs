//! Codec throughput: parse, pack, and parse + pack of a typical 0200 for both packagers.
//!
//! Target (task brief): parse + pack under 1 µs on one core.
//! Run: `cargo bench -p switchyard-switch --bench codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard_switch::iso8583::{Message, Mti, Packager};

/// A withdrawal as an ATM sends it: fields 2,3,4,7,11,12,13,14,22,25,35,37,41,42,49,123,64.
fn typical_0200() -> Message {
    let mut msg = Message::new(Mti::FINANCIAL_REQUEST);
    for (n, value) in [
        (2, "6011000000000004"),
        (3, "011000"),
        (4, "000000050000"),
        (7, "1122093015"),
        (11, "000124"),
        (12, "163015"),
        (13, "1122"),
        (14, "2812"),
        (22, "051"),
        (25, "00"),
        (35, "6011000000000004=2812101"),
        (37, "432109876543"),
        (41, "ATM00001"),
        (42, "SWITCHYARD-0001"),
        (49, "360"),
        (123, "4A1B2C3D4E5F60718293A4B5C6D7E8F9"),
    ] {
        msg.set_str(n, value);
    }
    msg.set(64, [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]);
    msg
}

fn codec(c: &mut Criterion) {
    let msg = typical_0200();
    for packager in [Packager::ascii(), Packager::binary_bitmap()] {
        let wire = packager.pack(&msg).expect("typical 0200 packs");
        let name = packager.name();
        c.bench_function(&format!("{name}/parse"), |b| {
            b.iter(|| packager.unpack(black_box(&wire)).expect("parses"))
        });
        let mut out = Vec::with_capacity(512);
        c.bench_function(&format!("{name}/pack"), |b| {
            b.iter(|| {
                out.clear();
                packager
                    .pack_into(black_box(&msg), &mut out)
                    .expect("packs");
                out.len()
            })
        });
        c.bench_function(&format!("{name}/parse+pack"), |b| {
            b.iter(|| {
                let parsed = packager.unpack(black_box(&wire)).expect("parses");
                packager.pack(&parsed).expect("packs")
            })
        });
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);

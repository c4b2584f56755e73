//! libFuzzer target: every input is one case of the switch's fuzz harness
//! (`switchyard_switch::fuzzing`): a fresh copy of a provisioned SQLite store, then the frames
//! the input chooses, handed to `handle_frame` on ATM and station connections. A panic or a
//! violated invariant (see the harness's docs) is a crash.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_switch::fuzzing::Harness;

static HARNESS: OnceLock<Harness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let harness = HARNESS.get_or_init(|| Harness::new().expect("fuzz harness setup"));
    if let Err(violation) = harness.run(data) {
        panic!("{violation}");
    }
});

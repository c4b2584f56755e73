//! Switchyard operator: reconciles `BankSwitch` and `KeyRotation` (skeleton; built in its own issue).
#![forbid(unsafe_code)]

fn main() {
    eprintln!("switchyard-operator: not built yet");
    std::process::exit(2);
}

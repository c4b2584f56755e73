//! `switchyard-atm`: ATM simulator and load generator.
fn main() {}

//! `switchyard-switch` entry point.
fn main() {}

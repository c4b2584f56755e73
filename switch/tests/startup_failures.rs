//! A switch that cannot work refuses to start, says why in one log line, exits non-zero and
//! leaves the reason in the termination-message file Kubernetes reads (the operator quotes it in
//! the BankSwitch's Degraded condition). The key material itself never appears in the output.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-switch");

const GOOD_LMK: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const GOOD_KEK: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

/// Writes a config with the given LMK and tokens file contents; returns the config path.
fn config(dir: &Path, lmk: &str, tokens: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("lmk.hex"), lmk).unwrap();
    std::fs::write(dir.join("kek.hex"), GOOD_KEK).unwrap();
    std::fs::write(dir.join("tokens"), tokens).unwrap();
    let path = dir.join("switch.toml");
    std::fs::write(
        &path,
        format!(
            "[iso8583]\nlisten = \"127.0.0.1:0\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntokens_file = \"{d}/tokens\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [database]\nurl = \"sqlite://{d}/switch.db?mode=rwc\"\n\
             [keys]\nlmk_file = \"{d}/lmk.hex\"\nkek_file = \"{d}/kek.hex\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

/// Runs `serve --migrate`; returns (exit code, stderr, termination message).
fn serve(dir: &Path, config: &Path) -> (Option<i32>, String, String) {
    let termination = dir.join("termination-log");
    std::fs::write(&termination, "").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(["--log-format", "json", "serve", "--migrate"])
        .env("SWITCHYARD_TERMINATION_LOG", &termination)
        .output()
        .expect("run switchyard-switch");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        std::fs::read_to_string(&termination).unwrap(),
    )
}

#[test]
fn a_short_lmk_fails_start_up_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let lmk = "00112233445566778899aabbccddeeff"; // 16 bytes: an AES-128 key, not the LMK
    let cfg = config(dir.path(), lmk, "admin:0123456789abcdef0123456789abcdef\n");
    let (code, stderr, termination) = serve(dir.path(), &cfg);
    assert_ne!(code, Some(0), "must exit non-zero; stderr: {stderr}");
    assert!(
        termination.contains("LMK"),
        "termination message: {termination:?}"
    );
    assert!(stderr.contains("LMK"), "{stderr}");
    assert!(
        !stderr.contains(lmk) && !termination.contains(lmk),
        "key material leaked"
    );
}

#[test]
fn a_malformed_tokens_file_fails_start_up_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), GOOD_LMK, "this line has no role\n");
    let (code, stderr, termination) = serve(dir.path(), &cfg);
    assert_ne!(code, Some(0), "must exit non-zero; stderr: {stderr}");
    assert!(
        termination.to_lowercase().contains("token"),
        "termination message: {termination:?}"
    );
    assert!(
        !stderr.contains("this line has no role"),
        "token file content leaked: {stderr}"
    );
}

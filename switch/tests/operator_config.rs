//! The switch accepts exactly the configuration the operator renders: the ConfigMap snapshots of
//! `operator/tests/snapshots` load into `Settings` (which refuses unknown keys), so a key added on
//! one side without the other fails here rather than as a crash-looping pod.

use std::collections::BTreeMap;

use figment::Figment;
use figment::providers::{Format, Yaml};
use switchyard_switch::settings::Settings;

fn rendered_switch_toml(snapshot: &str) -> String {
    let path = format!(
        "{}/../operator/tests/snapshots/{snapshot}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // insta snapshots start with a `---` front matter block.
    let body = text.splitn(3, "---\n").nth(2).expect("snapshot body");
    let object: BTreeMap<String, figment::value::Value> = Figment::from(Yaml::string(body))
        .extract()
        .expect("ConfigMap YAML");
    // `find_ref` would split the key at its dot: look it up in the dictionary directly.
    object["data"]
        .as_dict()
        .and_then(|data| data.get("switch.toml"))
        .and_then(|v| v.as_str())
        .expect("data.switch.toml")
        .to_string()
}

fn load(snapshot: &str) -> Settings {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switch.toml");
    std::fs::write(&file, rendered_switch_toml(snapshot)).unwrap();
    Settings::load_from(Some(&file), Vec::new()).unwrap_or_else(|e| panic!("{snapshot}: {e}"))
}

#[test]
fn embedded_mode_config_loads() {
    let s = load("render_snapshots__embedded-minimal__ConfigMap__config.snap");
    assert_eq!(s.iso8583.listen.port(), 8583);
    assert!(
        s.database
            .url
            .as_deref()
            .is_some_and(|u| u.starts_with("sqlite://"))
    );
}

#[test]
fn postgres_mode_config_loads_with_routing_and_upstreams() {
    let s = load("render_snapshots__postgres-full__ConfigMap__config.snap");
    assert_eq!(s.iso8583.packager, "binary-bitmap");
    assert!(s.database.url_file.is_some());
    assert_eq!(s.routing.routes[0].upstream, "issuer-b");
    assert_eq!(s.upstreams[0].station_id, "ACQ001");
    assert!(s.upstreams[0].stand_in.enabled);
    // BankSwitch spec.telemetry and routing.upstreams[].propagateTrace (README "Traces and logs")
    assert!(s.upstreams[0].propagate_trace);
    let export = s
        .telemetry
        .resolve(|_| None)
        .unwrap()
        .expect("an OTLP endpoint");
    assert_eq!(export.endpoint, "http://otel-collector.monitoring:4318");
    assert_eq!(export.sample_ratio, 0.1);
}

#[test]
fn embedded_mode_without_telemetry_exports_nothing() {
    let s = load("render_snapshots__embedded-minimal__ConfigMap__config.snap");
    assert_eq!(s.telemetry.resolve(|_| None).unwrap(), None);
    assert!(s.upstreams.iter().all(|u| !u.propagate_trace));
}

#[test]
fn embedded_mode_with_backups_config_loads_and_plans_the_backups() {
    let s = load("render_snapshots__embedded-backup__ConfigMap__config.snap");
    assert_eq!(s.backup.schedule.as_deref(), Some("0 * * * *"));
    assert_eq!(
        s.backup.dir,
        std::path::PathBuf::from("/var/lib/switchyard-backups")
    );
    assert_eq!(s.backup.retain, 24);
    // what `serve` checks at start: the schedule parses and the store is embedded SQLite
    let plan = switchyard_switch::backup::schedule::BackupPlan::from_settings(
        &s,
        switchyard_switch::store::Backend::Sqlite,
    )
    .expect("a valid [backup]");
    assert!(plan.is_some());
}

//! The switch accepts exactly the configuration the operator renders: both ConfigMap snapshots of
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
}

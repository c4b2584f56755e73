//! Validation of a `BankSwitch` spec beyond what the CRD schema can express; pure, no client.
//!
//! The schema (patterns, ranges, CEL rules) stops most mistakes at `kubectl apply`. This step
//! repeats the cross-field rules (so `render` catches them offline and an older CRD in the cluster
//! cannot let them through) and parses durations into values the builders and the scaler use.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;

use crate::crd::bank_switch::{BankSwitch, BankSwitchSpec};

/// Longest BankSwitch name: leaves room for `-migrate-<hash>` inside a 63-character DNS label.
pub const MAX_NAME_LEN: usize = 40;

/// One thing wrong with a spec, with the field path a user would look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecProblem {
    /// Field path, e.g. `spec.replicas`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A spec the operator cannot act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    /// The object has no `metadata.name`.
    #[error("failed to validate BankSwitch: metadata.name is missing")]
    MissingName,
    /// The object has no namespace (BankSwitch is namespaced).
    #[error("failed to validate BankSwitch {name}: metadata.namespace is missing")]
    MissingNamespace {
        /// Object name.
        name: String,
    },
    /// One or more spec fields are unusable.
    #[error("failed to validate BankSwitch spec: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    InvalidSpec {
        /// Every problem found, so a user fixes them in one edit.
        problems: Vec<SpecProblem>,
    },
}

/// Where the switch keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageMode {
    /// Embedded SQLite on a PVC: one replica, not for production.
    EmbeddedSqlite,
    /// Shared PostgreSQL from `spec.database`.
    Postgres,
}

/// Durations from the spec, parsed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedDurations {
    /// `spec.storeAndForward.drainers.pollInterval`.
    pub drainer_poll_interval: Duration,
    /// `spec.storeAndForward.drainers.cooldown`.
    pub drainer_cooldown: Duration,
    /// `spec.hibernation.drainTimeout`.
    pub hibernation_drain_timeout: Duration,
}

/// A spec that passed validation, with the identity the builders need.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedBankSwitch {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.generation` (absent for offline renders).
    pub generation: Option<i64>,
    /// Controller owner reference for every built object (absent when the object has no uid yet,
    /// e.g. in an offline render of a file that was never applied).
    pub owner: Option<OwnerReference>,
    /// The spec as written (defaults applied by serde).
    pub spec: BankSwitchSpec,
    /// Embedded SQLite or PostgreSQL.
    pub storage_mode: StorageMode,
    /// Parsed durations.
    pub durations: ParsedDurations,
}

/// Parses a Go-style duration (`90s`, `5m`, `1h30m`, `250ms`) that must be positive.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let parsed: kube::core::Duration = value
        .parse()
        .map_err(|e| format!("`{value}` is not a duration like 30s, 5m or 1h30m ({e})"))?;
    if parsed.is_negative() {
        return Err(format!("`{value}` is negative"));
    }
    let std: Duration = parsed.into();
    if std.is_zero() {
        return Err(format!("`{value}` must be longer than zero"));
    }
    Ok(std)
}

/// Renders a duration the way the switch's config parser (humantime) reads it: whole seconds
/// when possible, else milliseconds, so `1h30m` in the CRD becomes `5400s` in the TOML.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Whether `value` is `address/prefix` with a prefix that fits the address family (what the
/// API server accepts in a NetworkPolicy `ipBlock`).
fn is_cidr(value: &str) -> bool {
    let Some((addr, prefix)) = value.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix <= 32,
        Ok(std::net::IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}

/// A DNS name cert-manager accepts in `dnsNames`: dot-separated labels of letters, digits and
/// hyphens (not at either end), at most 253 characters; a leading `*.` wildcard is allowed.
fn is_dns_name(value: &str) -> bool {
    let name = value.strip_prefix("*.").unwrap_or(value);
    !name.is_empty()
        && value.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Validates the object and returns what the builders need.
/// The configuration a `spec.env` name would override that the operator renders itself from
/// other fields (a Service, probe, Secret mount or volume depends on it), if any.
fn operator_owned_env(name: &str) -> Option<&'static str> {
    const OWNED: [(&str, &str); 10] = [
        (
            "SWITCHYARD_ISO8583__LISTEN",
            "the ISO 8583 listener (spec.iso8583)",
        ),
        (
            "SWITCHYARD_ISO8583__TLS",
            "the ISO 8583 TLS files (spec.tls)",
        ),
        ("SWITCHYARD_ADMIN__LISTEN", "the admin listener"),
        (
            "SWITCHYARD_ADMIN__TOKENS_FILE",
            "the admin tokens file (spec.admin)",
        ),
        ("SWITCHYARD_ADMIN__TLS", "the admin TLS files (spec.tls)"),
        (
            "SWITCHYARD_METRICS__LISTEN",
            "the metrics and probe listener",
        ),
        (
            "SWITCHYARD_DATABASE__",
            "the database (spec.database, spec.storage)",
        ),
        ("SWITCHYARD_KEYS__", "the key files (spec.keys)"),
        ("SWITCHYARD_BACKUP__DIR", "the backup volume (spec.backup)"),
        ("SWITCHYARD_CONFIG", "the configuration file"),
    ];
    OWNED
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .map(|(_, what)| *what)
}

pub fn validate(bs: &BankSwitch) -> Result<ValidatedBankSwitch, ValidationError> {
    let name = bs
        .metadata
        .name
        .clone()
        .ok_or(ValidationError::MissingName)?;
    let namespace = bs
        .metadata
        .namespace
        .clone()
        .ok_or_else(|| ValidationError::MissingNamespace { name: name.clone() })?;
    let spec = &bs.spec;
    let mut problems = Vec::new();
    let mut problem = |field: &str, message: String| {
        problems.push(SpecProblem {
            field: field.to_owned(),
            message,
        })
    };

    if name.len() > MAX_NAME_LEN {
        problem(
            "metadata.name",
            format!("must be at most {MAX_NAME_LEN} characters so derived object names fit 63"),
        );
    }
    if spec.image.trim().is_empty() {
        problem("spec.image", "must name the switchyard-switch image".into());
    }
    if spec.replicas < 0 {
        problem("spec.replicas", "must not be negative".into());
    }
    if spec.replicas > 1 && spec.database.is_none() {
        problem(
            "spec.replicas",
            format!(
                "{} replicas need spec.database (PostgreSQL); embedded SQLite runs exactly one",
                spec.replicas
            ),
        );
    }

    if let Some(db) = &spec.database
        && db.url_secret_ref.is_some() == db.cnpg.is_some()
    {
        problem(
            "spec.database",
            "set exactly one of urlSecretRef (a postgres:// URL in a Secret) or cnpg.clusterRef (a CloudNativePG Cluster)"
                .into(),
        );
    }
    if let Some(backup) = &spec.backup {
        if spec.database.is_some() {
            problem(
                "spec.backup",
                "scheduled backups are for the embedded SQLite store only; with spec.database back up the database itself (CloudNativePG: spec.backup of the Cluster, continuous WAL archiving and point-in-time recovery)"
                    .into(),
            );
        }
        if let Err(reason) = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(&backup.schedule)
        {
            problem(
                "spec.backup.schedule",
                format!(
                    "`{}` is not a five-field cron expression (UTC: minute hour day-of-month month day-of-week, e.g. \"0 * * * *\"): {reason}",
                    backup.schedule
                ),
            );
        }
        if backup.retain < 1 {
            problem("spec.backup.retain", "must be at least 1".into());
        }
    }

    let mut durations = Vec::new();
    let mut check_duration = |field: &str, value: &str| match parse_duration(value) {
        Ok(d) => Some(d),
        Err(message) => {
            durations.push(SpecProblem {
                field: field.to_owned(),
                message,
            });
            None
        }
    };
    check_duration("spec.iso8583.idleTimeout", &spec.iso8583.idle_timeout);
    check_duration("spec.keys.grace", &spec.keys.grace);
    let saf = &spec.store_and_forward;
    check_duration("spec.storeAndForward.lease", &saf.lease);
    let backoff_initial =
        check_duration("spec.storeAndForward.backoff.initial", &saf.backoff.initial);
    let backoff_max = check_duration("spec.storeAndForward.backoff.max", &saf.backoff.max);
    let poll = check_duration(
        "spec.storeAndForward.drainers.pollInterval",
        &saf.drainers.poll_interval,
    );
    let cooldown = check_duration(
        "spec.storeAndForward.drainers.cooldown",
        &saf.drainers.cooldown,
    );
    let drain_timeout = check_duration(
        "spec.hibernation.drainTimeout",
        &spec.hibernation.drain_timeout,
    );
    check_duration(
        "spec.monitoring.serviceMonitor.interval",
        &spec.monitoring.service_monitor.interval,
    );
    for (i, up) in spec.routing.upstreams.iter().enumerate() {
        let base = format!("spec.routing.upstreams[{i}]");
        check_duration(&format!("{base}.heartbeatInterval"), &up.heartbeat_interval);
        check_duration(&format!("{base}.timeout"), &up.timeout);
        check_duration(
            &format!("{base}.circuitBreaker.window"),
            &up.circuit_breaker.window,
        );
        check_duration(
            &format!("{base}.circuitBreaker.resetTimeout"),
            &up.circuit_breaker.reset_timeout,
        );
    }
    problems.extend(durations);
    let mut problem = |field: &str, message: String| {
        problems.push(SpecProblem {
            field: field.to_owned(),
            message,
        })
    };

    if drain_timeout
        .is_some_and(|d| d.as_secs() > switchyard_api::maintenance::MAX_DRAIN_TIMEOUT_SECONDS)
    {
        problem(
            "spec.hibernation.drainTimeout",
            "must be at most 24h (the switch refuses longer drains)".into(),
        );
    }

    if let (Some(initial), Some(max)) = (backoff_initial, backoff_max)
        && initial > max
    {
        problem(
            "spec.storeAndForward.backoff",
            "initial must not exceed max".into(),
        );
    }
    let drainers = &saf.drainers;
    if drainers.min_replicas < 0 || drainers.max_replicas < 0 {
        problem(
            "spec.storeAndForward.drainers",
            "replica bounds must not be negative".into(),
        );
    }
    if drainers.min_replicas > drainers.max_replicas {
        problem(
            "spec.storeAndForward.drainers",
            format!(
                "minReplicas {} exceeds maxReplicas {}",
                drainers.min_replicas, drainers.max_replicas
            ),
        );
    }
    if drainers.target_backlog_per_replica < 1 {
        problem(
            "spec.storeAndForward.drainers.targetBacklogPerReplica",
            "must be at least 1".into(),
        );
    }
    if spec.termination.pre_stop_delay_seconds >= spec.termination.grace_period_seconds {
        problem(
            "spec.termination.preStopDelaySeconds",
            "must be shorter than gracePeriodSeconds, or SIGTERM never comes in time to drain"
                .into(),
        );
    }

    let mut seen = std::collections::BTreeSet::new();
    for (i, up) in spec.routing.upstreams.iter().enumerate() {
        if !seen.insert(up.name.as_str()) {
            problem(
                &format!("spec.routing.upstreams[{i}].name"),
                format!("upstream `{}` is listed twice", up.name),
            );
        }
        if up.endpoints.is_empty() {
            problem(
                &format!("spec.routing.upstreams[{i}].endpoints"),
                "needs at least one host:port".into(),
            );
        }
    }
    for (i, route) in spec.routing.routes.iter().enumerate() {
        if !seen.contains(route.upstream.as_str()) {
            problem(
                &format!("spec.routing.routes[{i}].upstream"),
                format!(
                    "names `{}`, which is not in spec.routing.upstreams",
                    route.upstream
                ),
            );
        }
    }

    if let Some(tls) = &spec.tls {
        if tls.issuer_ref.is_some() == tls.secret_name.is_some() {
            problem(
                "spec.tls",
                "needs exactly one of issuerRef (cert-manager) or secretName (an existing TLS Secret)"
                    .into(),
            );
        }
        if !tls.dns_names.is_empty() && tls.issuer_ref.is_none() {
            problem(
                "spec.tls.dnsNames",
                "names go into the cert-manager Certificate; with secretName the Secret's certificate decides"
                    .into(),
            );
        }
        for (i, dns) in tls.dns_names.iter().enumerate() {
            if !is_dns_name(dns) {
                problem(
                    &format!("spec.tls.dnsNames[{i}]"),
                    format!(
                        "`{dns}` is not a DNS name like atm.bank.example (a leading *. is allowed)"
                    ),
                );
            }
        }
        if spec.simulator.enabled && (!tls.iso8583 || tls.iso8583_client_auth) {
            problem(
                "spec.simulator.enabled",
                "with spec.tls the web ATM needs tls.iso8583: true and iso8583ClientAuth: false (it verifies both ports with the Secret's ca.crt and has no client certificate)"
                    .into(),
            );
        }
        if tls.iso8583_client_auth && !tls.iso8583 {
            problem(
                "spec.tls.iso8583ClientAuth",
                "client certificates on the ISO 8583 port need iso8583: true".into(),
            );
        }
    }
    let np = &spec.network_policy;
    for (field, peers) in [
        ("isoFrom", &np.iso_from),
        ("adminFrom", &np.admin_from),
        ("egressTo", &np.egress_to),
    ] {
        for (i, peer) in peers.iter().enumerate() {
            let field = format!("spec.networkPolicy.{field}[{i}]");
            let selectors = peer.namespace_selector.is_some() || peer.pod_selector.is_some();
            match &peer.cidr {
                Some(_) if selectors => problem(
                    &field,
                    "is either a cidr or namespace/pod selectors, not both".into(),
                ),
                Some(cidr) if !is_cidr(cidr) => problem(
                    &format!("{field}.cidr"),
                    format!("`{cidr}` is not an address block like 10.20.0.0/16 or fd00::/8"),
                ),
                None if !selectors => problem(
                    &field,
                    "needs a cidr or a namespaceSelector/podSelector".into(),
                ),
                _ => {}
            }
        }
    }

    let mut seen = std::collections::BTreeSet::new();
    for (i, var) in spec.env.iter().enumerate() {
        let field = format!("spec.env[{i}]");
        if let Some(owner) = operator_owned_env(&var.name) {
            problem(
                &field,
                format!(
                    "`{}` overrides {owner}, which the operator sets from the BankSwitch",
                    var.name
                ),
            );
        } else if !seen.insert(var.name.as_str()) {
            problem(&field, format!("`{}` is listed twice", var.name));
        }
    }

    if !problems.is_empty() {
        return Err(ValidationError::InvalidSpec { problems });
    }
    let (Some(drainer_poll_interval), Some(drainer_cooldown), Some(hibernation_drain_timeout)) =
        (poll, cooldown, drain_timeout)
    else {
        // Unreachable in practice: a failed parse above pushed a problem and returned.
        return Err(ValidationError::InvalidSpec { problems: vec![] });
    };
    Ok(ValidatedBankSwitch {
        name,
        namespace,
        generation: bs.metadata.generation,
        owner: bs.controller_owner_ref(&()),
        spec: spec.clone(),
        storage_mode: if spec.database.is_some() {
            StorageMode::Postgres
        } else {
            StorageMode::EmbeddedSqlite
        },
        durations: ParsedDurations {
            drainer_poll_interval,
            drainer_cooldown,
            hibernation_drain_timeout,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::bank_switch::{DatabaseSpec, RouteSpec, SecretKeyRef};
    use rstest::rstest;

    pub(crate) fn minimal() -> BankSwitch {
        serde_yaml::from_str(
            r#"
apiVersion: switchyard.io/v1alpha1
kind: BankSwitch
metadata: {name: atm-switch, namespace: payments}
spec:
  image: registry.example/switchyard:1.0.0
  keys:
    lmkSecretRef: {name: switch-keys, key: lmk}
    kekSecretRef: {name: switch-keys, key: kek}
  admin:
    tokenSecretRef: {name: switch-admin, key: tokens}
"#,
        )
        .expect("minimal BankSwitch parses")
    }

    #[test]
    fn minimal_spec_is_embedded_sqlite_with_defaults() {
        let v = validate(&minimal()).expect("valid");
        assert_eq!(v.storage_mode, StorageMode::EmbeddedSqlite);
        assert_eq!(v.spec.replicas, 1);
        assert_eq!(v.durations.drainer_cooldown, Duration::from_secs(300));
        assert!(v.owner.is_none(), "no uid, so no owner reference");
    }

    #[test]
    fn several_replicas_without_database_are_refused_with_the_field_named() {
        let mut bs = minimal();
        bs.spec.replicas = 3;
        let err = validate(&bs).expect_err("invalid");
        assert!(err.to_string().contains("spec.replicas"), "{err}");
        assert!(err.to_string().contains("spec.database"), "{err}");
        bs.spec.database = Some(DatabaseSpec {
            url_secret_ref: Some(SecretKeyRef {
                name: "db".into(),
                key: "url".into(),
            }),
            cnpg: None,
        });
        assert_eq!(
            validate(&bs).expect("valid").storage_mode,
            StorageMode::Postgres
        );
    }

    fn cnpg(cluster: &str) -> Option<crate::crd::bank_switch::CnpgSpec> {
        Some(crate::crd::bank_switch::CnpgSpec {
            cluster_ref: crate::crd::bank_switch::CnpgClusterRef {
                name: cluster.into(),
            },
        })
    }

    #[test]
    fn the_database_is_a_url_secret_or_a_cnpg_cluster_not_both() {
        let mut bs = minimal();
        bs.spec.database = Some(DatabaseSpec {
            url_secret_ref: None,
            cnpg: cnpg("payments-db"),
        });
        let v = validate(&bs).expect("valid");
        assert_eq!(v.storage_mode, StorageMode::Postgres);
        let (field, secret) = v.spec.database.unwrap().url_secret().unwrap();
        assert_eq!(field, "spec.database.cnpg.clusterRef");
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("payments-db-app", "uri")
        );
        for database in [
            DatabaseSpec {
                url_secret_ref: None,
                cnpg: None,
            },
            DatabaseSpec {
                url_secret_ref: Some(SecretKeyRef {
                    name: "db".into(),
                    key: "url".into(),
                }),
                cnpg: cnpg("payments-db"),
            },
        ] {
            bs.spec.database = Some(database);
            let Err(ValidationError::InvalidSpec { problems }) = validate(&bs) else {
                panic!("expected InvalidSpec");
            };
            assert_eq!(problems[0].field, "spec.database");
            assert!(problems[0].message.contains("exactly one"), "{problems:?}");
        }
    }

    #[test]
    fn extra_env_reaches_every_container_but_not_what_the_operator_renders() {
        let mut bs = minimal();
        bs.spec.env = serde_yaml::from_str(
            "[{name: SWITCHYARD_ADMIN__IDEMPOTENCY_RETENTION, value: 72h}, {name: RUST_LOG, value: debug}]",
        )
        .unwrap();
        let v = validate(&bs).expect("valid");
        let deployment = crate::bank_switch::build::build_switch_deployment(&v, "hash");
        let env = deployment.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        assert_eq!(env.len(), 2);
        assert_eq!(env[0].value.as_deref(), Some("72h"));
        let job = crate::bank_switch::build::build_migration_job(&v);
        let job_env = job.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        assert_eq!(job_env, env, "the migration Job gets the same");

        bs.spec.env = serde_yaml::from_str(
            "[{name: SWITCHYARD_DATABASE__URL, value: x}, {name: SWITCHYARD_ISO8583__LISTEN, value: x}, \
              {name: RUST_LOG, value: a}, {name: RUST_LOG, value: b}]",
        )
        .unwrap();
        let Err(ValidationError::InvalidSpec { problems }) = validate(&bs) else {
            panic!("expected InvalidSpec");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["spec.env[0]", "spec.env[1]", "spec.env[3]"]);
        assert!(
            problems[0].message.contains("spec.database"),
            "{problems:?}"
        );
        assert!(problems[2].message.contains("twice"), "{problems:?}");
    }

    #[test]
    fn backups_need_embedded_sqlite_and_a_cron_schedule() {
        let mut bs = minimal();
        bs.spec.backup = serde_yaml::from_str("{schedule: '0 * * * *'}").unwrap();
        let v = validate(&bs).expect("valid");
        assert_eq!(v.spec.backup.as_ref().map(|b| b.retain), Some(7));

        bs.spec.backup = serde_yaml::from_str("{schedule: 'every hour', retain: 0}").unwrap();
        bs.spec.database = Some(DatabaseSpec {
            url_secret_ref: None,
            cnpg: cnpg("payments-db"),
        });
        let Err(ValidationError::InvalidSpec { problems }) = validate(&bs) else {
            panic!("expected InvalidSpec");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.backup", "spec.backup.schedule", "spec.backup.retain"]
        );
        assert!(
            problems[0].message.contains("CloudNativePG"),
            "{problems:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut bs = minimal();
        bs.spec.store_and_forward.drainers.min_replicas = 5;
        bs.spec.store_and_forward.drainers.max_replicas = 2;
        bs.spec.iso8583.idle_timeout = "soon".into();
        bs.spec.routing.routes.push(RouteSpec {
            prefix: "4111".into(),
            upstream: "issuer-x".into(),
        });
        let Err(ValidationError::InvalidSpec { problems }) = validate(&bs) else {
            panic!("expected InvalidSpec");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.iso8583.idleTimeout",
                "spec.storeAndForward.drainers",
                "spec.routing.routes[0].upstream"
            ]
        );
    }

    #[rstest]
    #[case("90s", Some(90_000))]
    #[case("1h30m", Some(5_400_000))]
    #[case("250ms", Some(250))]
    #[case("0s", None)]
    #[case("-5s", None)]
    #[case("5", None)]
    fn durations_parse_like_kubernetes(#[case] input: &str, #[case] millis: Option<u128>) {
        assert_eq!(parse_duration(input).ok().map(|d| d.as_millis()), millis);
    }

    #[rstest]
    #[case(Duration::from_secs(5400), "5400s")]
    #[case(Duration::from_millis(1500), "1500ms")]
    fn durations_render_for_the_switch(#[case] d: Duration, #[case] text: &str) {
        assert_eq!(format_duration(d), text);
    }
}

//! `switchyard-operator`: run the controllers, print the CRDs, or render a BankSwitch offline.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::FutureExt as _;
use kube_lease_manager::LeaseManagerBuilder;
use switchyard_operator::bank_switch::hibernation::HttpMaintenance;
use switchyard_operator::bank_switch::{self, Context, dereference::HttpSafStats};
use switchyard_operator::key_rotation::controller as key_rotation;
use switchyard_operator::metrics::Metrics;
use switchyard_operator::render::{RenderOptions, render};
use switchyard_operator::switch_admin::{AdminEndpoint, SwitchAdmin};
use switchyard_operator::{crd, http, telemetry};

/// Switchyard Kubernetes operator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers (leader-elected), serving /metrics, /healthz and /readyz.
    Run {
        /// Address of the metrics and health endpoint.
        #[arg(
            long,
            default_value = "0.0.0.0:8080",
            env = "SWITCHYARD_OPERATOR_LISTEN"
        )]
        listen: SocketAddr,
        /// Namespace of the leader-election Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Identity in the Lease (the pod name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Reconcile only BankSwitch and KeyRotation objects in this namespace (needs only
        /// namespaced Roles there); unset: every namespace (needs the ClusterRole).
        #[arg(long, env = "SWITCHYARD_WATCH_NAMESPACE")]
        watch_namespace: Option<String>,
    },
    /// Print the CRDs as YAML, or write them to a directory.
    Crd {
        /// Write `<plural>.<group>.yaml` files here instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Print every object the operator would apply for a BankSwitch file (offline).
    Render {
        /// BankSwitch YAML file (`-` for stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Namespace for objects without one.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Render as if monitoring.coreos.com were not served (no ServiceMonitor/PrometheusRule).
        #[arg(long)]
        no_monitoring_api: bool,
        /// Namespace the operator runs in (its pods are admitted to the admin port).
        #[arg(long, default_value = switchyard_operator::bank_switch::build::DEFAULT_OPERATOR_NAMESPACE)]
        operator_namespace: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd { out_dir: None } => print!("{}", crd::all_yaml()?),
        Command::Crd { out_dir: Some(dir) } => {
            for path in crd::write_all(&dir)? {
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Render {
            file,
            namespace,
            no_monitoring_api,
            operator_namespace,
        } => {
            let input = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("failed to read stdin")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("failed to read {}", file.display()))?
            };
            let opts = RenderOptions {
                default_namespace: namespace,
                monitoring_api_served: !no_monitoring_api,
                operator_namespace,
            };
            print!("{}", render(&input, &opts)?);
        }
        Command::Run {
            listen,
            lease_namespace,
            identity,
            watch_namespace,
        } => {
            run(
                listen,
                lease_namespace,
                identity,
                watch_namespace.filter(|n| !n.is_empty()),
            )
            .await?
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

async fn run(
    listen: SocketAddr,
    lease_namespace: String,
    identity: Option<String>,
    watch_namespace: Option<String>,
) -> anyhow::Result<()> {
    let _telemetry = telemetry::init();
    match &watch_namespace {
        Some(ns) => tracing::info!(namespace = %ns, "watching one namespace"),
        None => tracing::info!("watching every namespace"),
    }
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        let _ = stop_tx.send(true);
    });

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to bind {listen}"))?;
    let app = http::router(http::HttpState {
        metrics: Arc::clone(&metrics),
        ready: Arc::clone(&ready),
    });
    let http_task = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped())
            .into_future(),
    );

    let client = kube::Client::try_default()
        .await
        .context("failed to build a Kubernetes client (in-cluster or kubeconfig)")?;
    // One HTTP client for every switch admin API call (SAF figures and key rotations).
    let admin = SwitchAdmin::new(AdminEndpoint::ClusterService)
        .context("failed to build the HTTP client")?;
    let saf = Arc::new(HttpSafStats::new(admin.clone()));
    let ctx = Arc::new(
        Context::new(client.clone(), Arc::clone(&metrics), saf, identity.clone())
            .with_maintenance(Arc::new(HttpMaintenance::new(admin.clone())))
            .with_operator_namespace(lease_namespace.clone())
            .with_watch_namespace(watch_namespace.clone()),
    );
    let kr_ctx = Arc::new(
        key_rotation::Context::new(client.clone(), metrics, admin, identity.clone())
            .with_watch_namespace(watch_namespace),
    );

    let mut lease =
        LeaseManagerBuilder::new(client, "switchyard-operator").with_namespace(lease_namespace);
    if let Some(id) = identity {
        lease = lease.with_identity(id);
    }
    let manager = lease
        .build()
        .await
        .context("failed to set up the leader-election Lease")?;
    let (mut leader, lease_task) = manager.watch().await;
    // Standby replicas are healthy and ready: they serve metrics and take over on failover.
    ready.store(true, Ordering::Relaxed);

    let mut stop = stop_rx.clone();
    tracing::info!("waiting for leadership");
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => changed.context("leader election stopped")?,
            _ = stop.wait_for(|s| *s) => {
                drop(leader);
                let _ = lease_task.await;
                let _ = http_task.await;
                return Ok(());
            }
        }
    }
    tracing::info!("leading; starting controllers");
    let lost = {
        let mut leader = leader.clone();
        async move {
            let _ = leader.wait_for(|l| !*l).await;
        }
    };
    let lost_flag = Arc::new(AtomicBool::new(false));
    let lost_marker = Arc::clone(&lost_flag);
    let stop_or_lost = {
        let stopped = stopped();
        async move {
            tokio::select! {
                _ = stopped => {},
                _ = lost => {
                    lost_marker.store(true, Ordering::Relaxed);
                },
            }
        }
    };
    // Both controllers stop together, on shutdown or on a lost Lease.
    let stop_or_lost = stop_or_lost.shared();
    tokio::join!(
        bank_switch::run(ctx, stop_or_lost.clone()),
        key_rotation::run(kr_ctx, stop_or_lost),
    );
    // Dropping the receiver ends the lease task, which releases the Lease for a fast failover.
    drop(leader);
    let _ = lease_task.await;
    if lost_flag.load(Ordering::Relaxed) {
        anyhow::bail!("lost leadership; exiting so a fresh process can stand by");
    }
    let _ = http_task.await;
    tracing::info!("stopped");
    Ok(())
}

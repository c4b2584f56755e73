//! Wiring: builds the switch from its settings, binds the three listeners, runs until shutdown.
//!
//! `start` takes already-bound listeners so tests and the demo can use port 0; `serve` is the
//! production entry point that binds the configured addresses and waits for SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState, auth::Tokens};
use crate::crypto::{Hsm, Kek, Lmk, SoftHsm};
use crate::health::{self, Health};
use crate::http::{self, HttpLimits};
use crate::iso8583::Packager;
use crate::maintenance::{Maintenance, Wanted};
use crate::metrics::{Metrics, SwitchMetrics};
use crate::net::{server, session::SessionRegistry};
use crate::routing::drainer::Drainer;
use crate::routing::held::HeldReversals;
use crate::routing::{LinkDeps, Upstreams};
use crate::settings::Settings;
use crate::store::{self, ConnectOptions, KeyCache, KeyCachingStore, Store};
use crate::tls::ReloadingAcceptor;
use crate::txn::{SwitchContext, fleet, fleet::Fleet};

/// Why the switch could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Configuration or a secret file.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// The LMK or KEK.
    #[error(transparent)]
    Keys(#[from] crate::crypto::KeyError),
    /// The tokens file.
    #[error(transparent)]
    Tokens(#[from] admin::auth::TokensError),
    /// The database.
    #[error("failed to open the store: {0}")]
    Store(#[from] store::StoreError),
    /// A listener.
    #[error("failed to listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The packager name.
    #[error("invalid iso8583.packager: {0}")]
    Packager(String),
    /// An `[[upstreams]]` entry.
    #[error(transparent)]
    Upstream(#[from] crate::routing::LinkConfigError),
    /// `[backup]`, or the database lock a restore holds.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// `[admin.tls]` or `[iso8583.tls]` files.
    #[error("invalid [{section}.tls]: {source}")]
    Tls {
        /// `admin` or `iso8583`.
        section: &'static str,
        /// Why.
        #[source]
        source: crate::tls::TlsError,
    },
}

/// The secrets a switch needs, loaded from the files its settings name.
#[derive(Debug)]
pub struct Secrets {
    /// The HSM built from the LMK (and KEK).
    pub hsm: Arc<dyn Hsm>,
    /// Admin tokens.
    pub tokens: Arc<Tokens>,
}

impl Secrets {
    /// Loads the LMK (required), the KEK (optional: without it TMK import is refused) and the
    /// admin tokens file (required).
    pub fn load(settings: &Settings) -> Result<Self, StartError> {
        let lmk_file = settings.keys.lmk_file.as_ref().ok_or_else(|| {
            crate::settings::SettingsError::Value(
                "keys.lmk_file is required: a file with the 32-byte local master key in hex (64 characters); `switchyard-switch demo` shows one way to make it".into(),
            )
        })?;
        let lmk = Lmk::from_hex_file(lmk_file)?;
        let kek = match &settings.keys.kek_file {
            Some(path) => Some(Kek::from_hex_file(path)?),
            None => None,
        };
        let tokens = Tokens::from_file(&settings.admin.tokens_file)?;
        Ok(Self {
            hsm: Arc::new(SoftHsm::new(lmk, kek)),
            tokens: Arc::new(tokens),
        })
    }
}

/// The three bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// ISO 8583.
    pub iso: TcpListener,
    /// Admin API.
    pub admin: TcpListener,
    /// Metrics and probes.
    pub metrics: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(settings: &Settings) -> Result<Self, StartError> {
        async fn one(addr: SocketAddr) -> Result<TcpListener, StartError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        }
        Ok(Self {
            iso: one(settings.iso8583.listen).await?,
            admin: one(settings.admin.listen).await?,
            metrics: one(settings.metrics.listen).await?,
        })
    }
}

/// A running switch (tests, demo, `serve`).
#[derive(Debug)]
pub struct RunningSwitch {
    /// Where the ISO 8583 listener is.
    pub iso_addr: SocketAddr,
    /// Where the admin API is.
    pub admin_addr: SocketAddr,
    /// Where metrics and probes are.
    pub metrics_addr: SocketAddr,
    /// The shared context.
    pub ctx: Arc<SwitchContext>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningSwitch {
    /// Begins a graceful shutdown and waits for it to complete.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// A token that, when cancelled, begins a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the switch has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Opens the store the settings name.
pub async fn open_store(settings: &Settings) -> Result<Store, StartError> {
    let url = settings.database.resolve_url()?;
    let store = store::connect(
        &url,
        &ConnectOptions {
            max_connections: settings.database.max_connections,
            acquire_timeout: settings.database.acquire_timeout,
        },
    )
    .await?;
    Ok(store)
}

/// Starts the switch on bound listeners.
pub async fn start(
    settings: Settings,
    secrets: Secrets,
    store: Store,
    listeners: Listeners,
) -> Result<RunningSwitch, StartError> {
    let packager = Packager::by_name(&settings.iso8583.packager)
        .map_err(|e| StartError::Packager(e.to_string()))?;
    // a bad `[backup]` stops the start before anything runs
    let backups = crate::backup::schedule::BackupPlan::from_settings(&settings, store.backend())?;
    // reqwest and other clients in this process look the provider up
    crate::tls::install_crypto_provider();
    let metrics: Metrics = Arc::new(SwitchMetrics::new());
    let health = Arc::new(Health::default());
    // every key change this process makes goes through the wrapper and invalidates the cache
    let keys = Arc::new(KeyCache::new(
        settings.keys.cache_ttl,
        metrics.key_cache_hits.clone(),
        metrics.key_cache_misses.clone(),
    ));
    let store: Store = Arc::new(KeyCachingStore::new(store, keys.clone()));
    let upstreams = Arc::new(Upstreams::new(
        &settings.upstreams,
        &LinkDeps {
            packager,
            hsm: secrets.hsm.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
        },
    )?);
    let settings_held_max = settings.saf.held_reversals_max;
    let settings_registry = settings.registry.clone();
    // notifications between replicas come over their own PostgreSQL connection
    let listen_url = match store.backend() {
        store::Backend::Postgres => Some(settings.database.resolve_url()?),
        store::Backend::Sqlite => None,
    };
    let ctx = Arc::new(SwitchContext {
        settings,
        packager,
        store: store.clone(),
        keys,
        hsm: secrets.hsm,
        sessions: SessionRegistry::new(),
        fleet: Fleet::new(&settings_registry),
        metrics: metrics.clone(),
        health: health.clone(),
        upstreams,
        held_reversals: Arc::new(HeldReversals::new(settings_held_max, metrics.clone())),
        maintenance: Maintenance::new(),
    });
    let addr = |l: &TcpListener| {
        l.local_addr().map_err(|source| StartError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    };
    let iso_addr = addr(&listeners.iso)?;
    let admin_addr = addr(&listeners.admin)?;
    let metrics_addr = addr(&listeners.metrics)?;

    // A first store check before we call ourselves started, so /readyz is truthful at once.
    let verdict = health::check_store(&store).await;
    health.set_store(verdict.is_ok(), verdict.clone().err());
    // clears this replica's sessions of an earlier run before any sign-on; retried by the
    // heartbeat while the store is away
    if verdict.is_ok() {
        ctx.fleet.register(&ctx).await;
    }
    if let Err(reason) = &verdict {
        warn!(%reason, "switch starts not ready");
    }

    let tls = |section: &'static str, s: &Option<crate::settings::ServerTlsSettings>| {
        s.clone()
            .map(|s| ReloadingAcceptor::new(section, s, metrics.clone()).map(Arc::new))
            .transpose()
            .map_err(|source| StartError::Tls { section, source })
    };
    let tls = TlsAcceptors {
        iso: tls("iso8583", &ctx.settings.iso8583.tls)?,
        admin: tls("admin", &ctx.settings.admin.tls)?,
    };

    let shutdown = CancellationToken::new();
    if let Some(plan) = backups {
        tokio::spawn(plan.run(metrics.clone(), shutdown.child_token()));
    }
    let task = tokio::spawn(run(
        ctx.clone(),
        listen_url,
        secrets.tokens,
        listeners,
        tls,
        shutdown.clone(),
    ));
    health.set_started();
    info!(%iso_addr, %admin_addr, %metrics_addr, backend = ?store.backend(), packager = %ctx.settings.iso8583.packager, "switch started");
    Ok(RunningSwitch {
        iso_addr,
        admin_addr,
        metrics_addr,
        ctx,
        shutdown,
        task,
    })
}

/// The TLS sides of the listeners that have one.
struct TlsAcceptors {
    iso: Option<Arc<ReloadingAcceptor>>,
    admin: Option<Arc<ReloadingAcceptor>>,
}

async fn run(
    ctx: Arc<SwitchContext>,
    listen_url: Option<zeroize::Zeroizing<String>>,
    tokens: Arc<Tokens>,
    listeners: Listeners,
    tls: TlsAcceptors,
    shutdown: CancellationToken,
) {
    let stop_http = CancellationToken::new();
    let stop_background = CancellationToken::new();

    let watcher = tokio::spawn(health::watch_store(
        ctx.store.clone(),
        ctx.health.clone(),
        ctx.metrics.clone(),
        Duration::from_secs(2),
        stop_background.clone(),
    ));
    let heartbeat = tokio::spawn(fleet::heartbeat(ctx.clone(), stop_background.clone()));
    let pusher = tokio::spawn(fleet::pusher(ctx.clone(), stop_background.clone()));
    let listener = listen_url
        .map(|url| tokio::spawn(fleet::listen(ctx.clone(), url, stop_background.clone())));
    let activations = tokio::spawn(crate::txn::keys::activation_loop(
        ctx.clone(),
        Duration::from_secs(1),
        stop_background.clone(),
    ));
    let idempotency_purge = tokio::spawn(crate::admin::purge_idempotency_records(
        ctx.clone(),
        stop_background.clone(),
    ));
    let mut upstream_tasks = ctx.upstreams.start(in_process_drainer(&ctx).then(|| {
        Drainer::new(
            ctx.store.clone(),
            ctx.upstreams.clone(),
            ctx.settings.saf.clone(),
            Drainer::holder_name(),
            ctx.hsm.clone(),
        )
    }));
    let stop_held = CancellationToken::new();
    let held = {
        let ctx = ctx.clone();
        let stop = stop_held.clone();
        tokio::spawn(async move {
            ctx.held_reversals
                .run(ctx.store.clone(), &ctx.upstreams, stop)
                .await
        })
    };
    let gauges = tokio::spawn(health::refresh_gauges(
        crate::txn::keys::scrape_refresh(ctx.clone()),
        ctx.settings.metrics.refresh_interval,
        stop_background.clone(),
    ));
    let probes = health::router(ctx.health.clone(), ctx.metrics.clone());
    let metrics_server = tokio::spawn(http::serve(
        listeners.metrics,
        probes,
        HttpLimits::metrics(&ctx.settings.metrics),
        ctx.metrics.clone(),
        stop_http.clone(),
        None,
    ));
    let admin_router = admin::router(AdminState::new(ctx.clone(), tokens))
        .layer(axum::extract::DefaultBodyLimit::max(
            ctx.settings.admin.max_body_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            tls.admin.is_some(),
            http::security_headers,
        ));
    let admin_server = tokio::spawn(http::serve(
        listeners.admin,
        admin_router,
        HttpLimits::admin(&ctx.settings.admin),
        ctx.metrics.clone(),
        stop_http.clone(),
        tls.admin,
    ));
    let mut channel = IsoChannel {
        addr: listeners.iso.local_addr().ok(),
        ctx: ctx.clone(),
        tls: tls.iso,
        open: None,
    };
    channel.open(listeners.iso);
    serve_until_shutdown(&mut channel, &shutdown).await;

    // SPEC §2: readiness false at once, stop accepting, finish in-flight, close cleanly.
    info!("shutdown: readiness false, no longer accepting ISO 8583 connections");
    ctx.health.set_draining();
    channel.stop_accepting();
    // no new work to upstreams: the drainer settles the batch it holds and stops
    upstream_tasks.stop_drainer().await;
    channel.close("shutdown").await;
    // nothing can add a held reversal now; the links are still up for the last resort
    stop_held.cancel();
    let _ = held.await;
    let lost = ctx
        .held_reversals
        .last_attempt(&ctx.store, &ctx.upstreams, ctx.hsm.as_ref())
        .await;
    if lost > 0 {
        error!(
            lost,
            "shutdown: reversal advices were neither stored nor delivered; see the lines above"
        );
    }
    // in-flight routed requests are answered (or timed out) by now: sign off the links
    upstream_tasks.stop().await;
    stop_http.cancel();
    stop_background.cancel();
    let _ = admin_server.await;
    let _ = metrics_server.await;
    let _ = watcher.await;
    let _ = activations.await;
    let _ = idempotency_purge.await;
    let _ = gauges.await;
    let _ = heartbeat.await;
    let _ = pusher.await;
    if let Some(listener) = listener {
        let _ = listener.await;
    }
    // every connection is closed: the fleet need not wait for this replica's lease to end
    if let Err(err) = ctx.store.release_replica(ctx.fleet.replica()).await {
        warn!(error = %err, "failed to leave the session registry; its lease will end by itself");
    }
    ctx.store.close().await;
    info!("shutdown complete");
}

/// The ISO 8583 channel of a serving switch: the accept loop and its connection tasks (on the
/// tracker [`Maintenance::connections`]). SIGTERM and hibernation close it the same way.
struct IsoChannel {
    ctx: Arc<SwitchContext>,
    /// Where it listens, to listen there again after a hibernation.
    addr: Option<SocketAddr>,
    tls: Option<Arc<ReloadingAcceptor>>,
    /// The accept loop's stop token and task while it accepts.
    open: Option<(CancellationToken, JoinHandle<()>)>,
}

impl IsoChannel {
    /// Starts accepting on `listener`.
    fn open(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let connections = self.ctx.maintenance.connections();
        connections.reopen();
        let task = tokio::spawn(server::serve(
            listener,
            self.ctx.clone(),
            self.ctx.settings.iso8583.clone(),
            self.ctx.metrics.clone(),
            stop.clone(),
            connections.clone(),
            self.tls.clone(),
        ));
        self.open = Some((stop, task));
        self.ctx.maintenance.set_accepting(true);
    }

    fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Stops accepting at once; every connection finishes the transaction it is processing,
    /// answers it and closes.
    fn stop_accepting(&self) {
        if let Some((stop, _)) = &self.open {
            stop.cancel();
        }
    }

    /// Stops accepting (the listening socket is closed, so new connections are refused), waits
    /// up to `[iso8583] shutdown_timeout` for the connections to finish their in-flight
    /// transaction and close, then closes the sessions still left. Does nothing when closed.
    async fn close(&mut self, why: &'static str) {
        let Some((stop, task)) = self.open.take() else {
            return;
        };
        stop.cancel();
        let _ = task.await;
        self.ctx.maintenance.set_accepting(false);
        let connections = self.ctx.maintenance.connections();
        connections.close();
        let grace = self.ctx.settings.iso8583.shutdown_timeout;
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            warn!(
                ?grace,
                why, "connections still busy after the grace period; closing them"
            );
        }
        self.ctx.sessions.close_all();
    }
}

/// Serves until `shutdown`, closing the ISO 8583 channel while a hibernation is asked for and
/// reopening it on resume (retried every second while the address cannot be bound again).
async fn serve_until_shutdown(channel: &mut IsoChannel, shutdown: &CancellationToken) {
    let ctx = channel.ctx.clone();
    let mut wanted = ctx.maintenance.wanted();
    loop {
        let want = *wanted.borrow_and_update();
        match want {
            Wanted::Hibernate if channel.is_open() => {
                ctx.health.set_hibernating(true);
                info!(
                    "hibernating: readiness false, no longer accepting ISO 8583 connections; drainers keep running"
                );
                channel.close("hibernation").await;
                info!("hibernating: ISO 8583 channel closed");
                continue;
            }
            Wanted::Serve if !channel.is_open() => match channel.addr {
                Some(addr) => match TcpListener::bind(addr).await {
                    Ok(listener) => {
                        channel.open(listener);
                        ctx.maintenance.resumed();
                        ctx.health.set_hibernating(false);
                        info!(%addr, "resumed from hibernation: accepting ISO 8583 connections");
                        continue;
                    }
                    Err(err) => {
                        error!(%addr, error = %err, "failed to listen again after hibernation; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
                None => {
                    error!(
                        "cannot resume: the ISO 8583 listener's address is unknown; restart the process"
                    );
                }
            },
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = wanted.changed() => if changed.is_err() {
                // the context (and its sender) outlives this loop; just wait for shutdown
                shutdown.cancelled().await;
                return;
            },
        }
    }
}

/// Whether `serve` runs a drainer itself: as configured, else only on the embedded SQLite store.
fn in_process_drainer(ctx: &SwitchContext) -> bool {
    !ctx.upstreams.is_empty()
        && ctx
            .settings
            .saf
            .in_process_drainer
            .unwrap_or(ctx.store.backend() == store::Backend::Sqlite)
}

/// `switchyard-switch drain`: a SAF drainer process. Opens the links (signing on as the
/// station), serves `/metrics` and the probes, drains until SIGTERM, then settles its batch and
/// exits. Needs the LMK (link keys, MACs) but no admin tokens and no ISO 8583 listener.
pub async fn drain(settings: Settings) -> Result<(), StartError> {
    let packager = Packager::by_name(&settings.iso8583.packager)
        .map_err(|e| StartError::Packager(e.to_string()))?;
    let lmk_file = settings.keys.lmk_file.as_ref().ok_or_else(|| {
        crate::settings::SettingsError::Value(
            "keys.lmk_file is required: the drainer MACs advices under keys wrapped by the LMK"
                .into(),
        )
    })?;
    let hsm: Arc<dyn Hsm> = Arc::new(SoftHsm::new(Lmk::from_hex_file(lmk_file)?, None));
    // an embedded database stays locked against a restore while this process runs
    let _lock = crate::backup::DatabaseLock::for_store_url(&settings.database.resolve_url()?)?;
    let store = open_store(&settings).await?;
    let metrics: Metrics = Arc::new(SwitchMetrics::new());
    let health = Arc::new(Health::default());
    let upstreams = Arc::new(Upstreams::new(
        &settings.upstreams,
        &LinkDeps {
            packager,
            hsm: hsm.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
        },
    )?);
    if upstreams.is_empty() {
        warn!("no [[upstreams]] configured: this drainer has nothing to deliver to");
    }
    let verdict = health::check_store(&store).await;
    health.set_store(verdict.is_ok(), verdict.err());
    let listener = TcpListener::bind(settings.metrics.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: settings.metrics.listen,
            source,
        })?;
    let stop_background = CancellationToken::new();
    let watcher = tokio::spawn(health::watch_store(
        store.clone(),
        health.clone(),
        metrics.clone(),
        Duration::from_secs(2),
        stop_background.clone(),
    ));
    let refresh: health::ScrapeRefresh = {
        let (store, metrics) = (store.clone(), metrics.clone());
        Arc::new(move || {
            let (store, metrics) = (store.clone(), metrics.clone());
            Box::pin(async move {
                if let Ok(saf) = store.saf_stats(chrono::Utc::now()).await {
                    metrics.set_saf(&saf);
                }
            })
        })
    };
    let gauges = tokio::spawn(health::refresh_gauges(
        refresh,
        settings.metrics.refresh_interval,
        stop_background.clone(),
    ));
    let stop_http = CancellationToken::new();
    let probes = tokio::spawn(http::serve(
        listener,
        health::router(health.clone(), metrics.clone()),
        HttpLimits::metrics(&settings.metrics),
        metrics,
        stop_http.clone(),
        None,
    ));
    let holder = Drainer::holder_name();
    info!(%holder, upstreams = upstreams.iter().count(), "drainer started");
    let drainer = Drainer::new(
        store.clone(),
        upstreams.clone(),
        settings.saf.clone(),
        holder,
        hsm.clone(),
    );
    let tasks = upstreams.start(Some(drainer));
    health.set_started();
    wait_for_signal().await;
    health.set_draining();
    tasks.stop().await;
    stop_background.cancel();
    stop_http.cancel();
    let _ = watcher.await;
    let _ = gauges.await;
    let _ = probes.await;
    store.close().await;
    info!("drainer stopped");
    Ok(())
}

/// Production entry point: bind, start, wait for SIGTERM or Ctrl-C, shut down gracefully.
pub async fn serve(settings: Settings, migrate: bool) -> Result<(), StartError> {
    let secrets = Secrets::load(&settings)?;
    // an embedded database stays locked against a restore while this process runs
    let _lock = crate::backup::DatabaseLock::for_store_url(&settings.database.resolve_url()?)?;
    let store = open_store(&settings).await?;
    if migrate {
        store.migrate().await?;
        info!("migrations applied");
    }
    let listeners = Listeners::bind(&settings).await?;
    let running = start(settings, secrets, store, listeners).await?;
    let token = running.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        token.cancel();
    });
    running.wait().await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

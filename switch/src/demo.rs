//! `switchyard-switch demo`: the local quick start (SPEC §2). Embedded SQLite in a temporary or
//! given directory, freshly generated LMK, KEK and admin tokens, a switch on loopback, then a
//! simulated ATM through a whole session; then, unless `--once`, the web ATM (SPEC §7a) as a
//! terminal of its own with test cards, and keeps serving until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::RngExt;

use crate::app::{self, Listeners, Secrets};
use crate::atm::CardInput;
use crate::atm::provision::AdminClient;
use crate::atm::session::{self, SessionOptions};
use crate::domain::TerminalId;
use crate::iso8583::Packager;
use crate::settings::Settings;

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the database and generated secrets (default: a new temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run the ATM session, print it, stop the switch and exit.
    #[arg(long)]
    pub once: bool,
    /// ISO 8583 listener.
    #[arg(long, default_value = "127.0.0.1:8583")]
    pub iso_listen: SocketAddr,
    /// Admin API listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub admin_listen: SocketAddr,
    /// Metrics and probes listener.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,
    /// The web ATM's page (not started with `--once`).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub web_listen: SocketAddr,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(&mut buf[..]);
    hex::encode_upper(buf)
}

fn write_secret(path: &Path, content: &str) -> anyhow::Result<()> {
    std::fs::write(path, content).with_context(|| format!("failed to write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Runs the demo.
pub async fn run(args: DemoArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let (_temp, dir) = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
            (None, dir.clone())
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("switchyard-demo-")
                .tempdir()
                .context("failed to create a temporary directory")?;
            let path = temp.path().to_path_buf();
            (Some(temp), path)
        }
    };
    let lmk_file = dir.join("lmk.hex");
    let kek_file = dir.join("kek.hex");
    let tokens_file = dir.join("tokens");
    if !lmk_file.exists() {
        write_secret(&lmk_file, &random_hex(32))?;
        write_secret(&kek_file, &random_hex(32))?;
        write_secret(
            &tokens_file,
            &format!("admin:{}\nviewer:{}\n", random_hex(16), random_hex(16)),
        )?;
    }
    let admin_token = std::fs::read_to_string(&tokens_file)?
        .lines()
        .find_map(|l| l.strip_prefix("admin:").map(str::to_string))
        .context("the demo tokens file has no admin token")?;
    let kek = hex::decode(std::fs::read_to_string(&kek_file)?.trim())?;

    let mut settings = Settings::load(config)?;
    settings.database.url = Some(format!("sqlite://{}", dir.join("switchyard.db").display()));
    settings.database.url_file = None;
    settings.iso8583.listen = args.iso_listen;
    settings.admin.listen = args.admin_listen;
    settings.metrics.listen = args.metrics_listen;
    settings.admin.tokens_file = tokens_file.clone();
    settings.keys.lmk_file = Some(lmk_file);
    settings.keys.kek_file = Some(kek_file);
    if settings.routing.on_us.is_empty() {
        settings.routing.on_us = vec!["6011".into()];
    }
    let packager = Packager::by_name(&settings.iso8583.packager)?;

    let secrets = Secrets::load(&settings)?;
    let store = app::open_store(&settings).await?;
    store.migrate().await?;
    let listeners = Listeners::bind(&settings).await.context(
        "failed to bind the demo ports; pass --iso-listen/--admin-listen/--metrics-listen with free ports",
    )?;
    let running = app::start(settings, secrets, store, listeners).await?;
    println!("Switchyard demo");
    println!("  data and secrets : {}", dir.display());
    println!("  ISO 8583         : {} (ascii packager)", running.iso_addr);
    println!(
        "  admin API        : http://{}  (token: {})",
        running.admin_addr,
        tokens_file.display()
    );
    println!(
        "  metrics, probes  : http://{}/metrics  /readyz",
        running.metrics_addr
    );
    println!();

    let admin = AdminClient::new(format!("http://{}", running.admin_addr), admin_token.trim());
    // First run in a directory seeds ATM00001 / ACC-1 / 6011000000000004; later runs in the
    // same directory add a fresh terminal and card next to them.
    let fresh = admin.get("/v1/terminals/ATM00001").await.is_err();
    let suffix: u32 = rand::rng().random_range(0..100_000);
    let (terminal, account, pan) = if fresh {
        (
            "ATM00001".to_string(),
            "ACC-1".to_string(),
            "6011000000000004".to_string(),
        )
    } else {
        (
            format!("ATM{suffix:05}"),
            format!("ACC-{suffix}"),
            format!("601100000{suffix:05}00")[..16].to_string(),
        )
    };
    let web_admin = admin.clone();
    let web_kek = kek.clone();
    let opts = SessionOptions {
        iso_addr: running.iso_addr.to_string(),
        admin,
        kek,
        terminal: TerminalId::new(terminal)?,
        card: CardInput {
            pan,
            expiry: "2812".into(),
            pin: "1234".into(),
            currency: "360".into(),
        },
        account,
        provision_card: true,
        packager,
        // the demo stays plain TCP on loopback; README shows a TLS run
        tls: None,
    };
    let mut n = 0;
    let result = session::run(opts, |line| {
        n += 1;
        println!("[{n:>2}] {line}");
    })
    .await;
    if let Err(err) = &result {
        println!("demo step failed: {err}");
    }
    if args.once || result.is_err() {
        running.stop().await;
        result?;
        return Ok(());
    }
    println!();
    let web = start_web_atm(
        &args,
        &web_admin,
        &web_kek,
        &running.iso_addr.to_string(),
        packager,
    )
    .await;
    match &web {
        Ok((url, _, _)) => println!(
            "Web ATM: {url}  (insert a test card, PIN {})",
            crate::atm::web::setup::TEST_PIN
        ),
        Err(err) => println!("web ATM not started: {err:#}"),
    }
    println!("The switch keeps serving; press Ctrl-C to stop.");
    app::wait_for_signal().await;
    if let Ok((_, shutdown, task)) = web {
        shutdown.cancel();
        let _ = task.await;
    }
    running.stop().await;
    Ok(())
}

/// Provisions the web ATM's terminal and test cards on the demo switch and serves its page.
async fn start_web_atm(
    args: &DemoArgs,
    admin: &AdminClient,
    kek: &[u8],
    iso_addr: &str,
    packager: &'static Packager,
) -> anyhow::Result<(
    String,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    use crate::atm::web::{WebAtm, WebAtmConfig, setup};
    let listener = tokio::net::TcpListener::bind(args.web_listen)
        .await
        .with_context(|| {
            format!(
                "failed to listen on {}; pass --web-listen with a free port",
                args.web_listen
            )
        })?;
    let url = format!("http://{}", listener.local_addr()?);
    let provisioned = setup::provision(admin, kek, &setup::SetupOptions::default()).await?;
    let atm = WebAtm::new(WebAtmConfig {
        iso_addr: iso_addr.to_string(),
        terminal: provisioned.terminal,
        keys: provisioned.keys,
        packager,
        cards: provisioned.cards,
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(atm.serve(listener, shutdown.clone()));
    Ok((url, shutdown, task))
}

//! `switchyard-atm`: ATM simulator (`session`), browser ATM (`web`) and load generator (`load`).
//!
//! They provision their terminals through the admin API exactly as a terminal management system
//! would: a fresh TMK per terminal, delivered as a TR-31 block under the switch's KEK.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard_switch::atm::CardInput;
use switchyard_switch::atm::load::{self, LoadOptions, Scenario};
use switchyard_switch::atm::provision::AdminClient;
use switchyard_switch::atm::session::{self, SessionOptions};
use switchyard_switch::atm::web;
use switchyard_switch::crypto::{ClearKey, TerminalKeys};
use switchyard_switch::domain::TerminalId;
use switchyard_switch::iso8583::Packager;
use switchyard_switch::tls::TlsClient;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "switchyard-atm",
    version,
    about = "Switchyard ATM simulator and load generator"
)]
struct Cli {
    /// Switch ISO 8583 address.
    #[arg(
        long,
        env = "SWITCHYARD_ATM_ISO",
        default_value = "127.0.0.1:8583",
        global = true
    )]
    iso: String,
    /// Switch admin API base URL.
    #[arg(
        long,
        env = "SWITCHYARD_ATM_ADMIN",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    admin: String,
    /// File with the admin token (a line `admin:<token>` or just the token).
    #[arg(long, env = "SWITCHYARD_ATM_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// File with the switch's KEK in hex (TMKs are delivered under it).
    #[arg(long, env = "SWITCHYARD_ATM_KEK_FILE", global = true)]
    kek_file: Option<PathBuf>,
    /// Wire profile: ascii or binary-bitmap.
    #[arg(
        long,
        env = "SWITCHYARD_ATM_PACKAGER",
        default_value = "ascii",
        global = true
    )]
    packager: String,
    /// CA certificate (PEM) to trust: the ISO 8583 port is then reached over TLS, and an
    /// `https://` admin URL is verified against it.
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// CA certificate (PEM) that verifies an `https://` admin URL, when it is not `--tls-ca`'s:
    /// an admin API with a certificate from another CA, or an HTTPS admin API in front of a
    /// plain ISO 8583 port. Default: `--tls-ca`.
    #[arg(long, global = true)]
    admin_ca: Option<PathBuf>,
    /// Client certificate (PEM) for switches that require mutual TLS.
    #[arg(long, global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name the switch's certificate must carry (default: the host of `--iso` / `--admin`).
    #[arg(long, global = true)]
    tls_server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One full ATM session, printed step by step.
    Session {
        /// Terminal id to register.
        #[arg(long, default_value = "ATM00002")]
        terminal: String,
        /// Card PAN to issue and use.
        #[arg(long, default_value = "6011000000000012")]
        pan: String,
        /// Account to open for it.
        #[arg(long, default_value = "ACC-2")]
        account: String,
    },
    /// A browser ATM on `--listen` (SPEC §7a): provisions its own terminal and test cards
    /// through the admin API (`--token-file`, `--kek-file`), or runs as an existing terminal
    /// (`--terminal` and `--tmk-file`, cards from `--card` or issued through the admin API).
    Web {
        /// Address of the page.
        #[arg(long, env = "SWITCHYARD_ATM_LISTEN", default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// Existing terminal id (with `--tmk-file`); default: register a new one.
        #[arg(long, env = "SWITCHYARD_ATM_TERMINAL", requires = "tmk_file")]
        terminal: Option<String>,
        /// File with the existing terminal's clear TMK in hex.
        #[arg(long, env = "SWITCHYARD_ATM_TMK_FILE", requires = "terminal")]
        tmk_file: Option<PathBuf>,
        /// A card already issued on the switch, `PAN:YYMM[:label]` (repeatable); default:
        /// issue test cards through the admin API.
        #[arg(long = "card")]
        cards: Vec<String>,
        /// BIN of the test cards to issue (an on-us prefix of the switch).
        #[arg(long, env = "SWITCHYARD_ATM_BIN", default_value = "6011")]
        bin: String,
        /// A BIN the switch routes to an issuer that is down: adds an "issuer unavailable"
        /// test card.
        #[arg(long, env = "SWITCHYARD_ATM_OFFLINE_ISSUER_BIN")]
        offline_issuer_bin: Option<String>,
        /// Currency (ISO 4217 numeric) of the test accounts.
        #[arg(long, default_value = "360")]
        currency: String,
        /// How long to keep retrying the admin API at start (the switch may still be starting).
        #[arg(long, env = "SWITCHYARD_ATM_SETUP_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
        setup_timeout: Duration,
    },
    /// Registers an acquiring switch as a station on this (issuer) switch with a fresh TMK, and
    /// writes the clear TMK (hex) for the acquirer's `[[upstreams]].tmk_file`.
    Station {
        /// Station id (the acquirer's `station_id`).
        #[arg(long)]
        id: String,
        /// File to write the TMK to (created with mode 0600).
        #[arg(long)]
        tmk_out: PathBuf,
    },
    /// Many terminals at once; prints throughput and latency percentiles.
    Load {
        /// Connections, one provisioned terminal each.
        #[arg(long, default_value_t = 200)]
        connections: usize,
        /// How long to send, e.g. 10s.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Target total requests per second (default: as fast as answers come).
        #[arg(long)]
        rate: Option<f64>,
        /// What to send.
        #[arg(long, value_enum, default_value = "balance")]
        scenario: Scenario,
        /// BIN of the generated cards.
        #[arg(long, default_value = "6011")]
        bin: String,
        /// Create the cards and accounts on this admin API instead (the issuer's, when `--bin`
        /// is routed to an upstream).
        #[arg(long, requires = "card_token_file")]
        card_admin: Option<String>,
        /// Admin token file for `--card-admin`.
        #[arg(long)]
        card_token_file: Option<PathBuf>,
    },
}

fn read_token(path: &PathBuf) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read token file {}", path.display()))?;
    let token = text
        .lines()
        .map(str::trim)
        .find_map(|l| {
            l.strip_prefix("admin:")
                .or_else(|| (!l.contains(':') && !l.is_empty()).then_some(l))
        })
        .context("the token file has no admin token")?;
    Ok(token.to_string())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Web { .. } = cli.command {
        return web(cli).await;
    }
    let token_file = cli
        .token_file
        .as_ref()
        .context("--token-file is required (the switch's admin token)")?;
    let kek_file = cli
        .kek_file
        .as_ref()
        .context("--kek-file is required (the switch's KEK in hex)")?;
    let tls = match &cli.tls_ca {
        Some(ca) => Some(
            TlsClient::new(
                ca,
                cli.tls_cert.as_deref().zip(cli.tls_key.as_deref()),
                cli.tls_server_name.clone(),
            )
            .context("failed to set up TLS")?,
        ),
        None => None,
    };
    // the admin API is verified against its own CA when one is given (no client certificate:
    // it authenticates callers by token), else against the ISO port's
    let admin_tls = match &cli.admin_ca {
        Some(ca) => {
            Some(TlsClient::new(ca, None, None).context("failed to set up TLS for the admin API")?)
        }
        None => tls.clone(),
    };
    let admin_client = |url: &str, token: String| -> anyhow::Result<AdminClient> {
        Ok(match &admin_tls {
            Some(tls) => AdminClient::with_tls(url, token, tls)
                .context("failed to set up the admin API client")?,
            None => AdminClient::new(url, token),
        })
    };
    let admin = admin_client(&cli.admin, read_token(token_file)?)?;
    let kek = hex::decode(
        std::fs::read_to_string(kek_file)
            .with_context(|| format!("failed to read {}", kek_file.display()))?
            .trim(),
    )
    .context("the KEK file must be hex")?;
    let packager = Packager::by_name(&cli.packager)?;
    match cli.command {
        Command::Session {
            terminal,
            pan,
            account,
        } => {
            let opts = SessionOptions {
                iso_addr: cli.iso,
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
                tls: tls.clone(),
            };
            let mut n = 0;
            session::run(opts, |line| {
                n += 1;
                println!("[{n:>2}] {line}");
            })
            .await?;
        }
        Command::Web { .. } => unreachable!("handled above"),
        Command::Station { id, tmk_out } => {
            let id = TerminalId::new(id)?;
            let tmk = admin.provision_station(&kek, &id).await?;
            write_private(&tmk_out, tmk.as_bytes())?;
            println!(
                "station {id} registered; TMK written to {}",
                tmk_out.display()
            );
        }
        Command::Load {
            connections,
            duration,
            rate,
            scenario,
            bin,
            card_admin,
            card_token_file,
        } => {
            let card_admin = match (card_admin, card_token_file) {
                (Some(url), Some(file)) => Some(admin_client(&url, read_token(&file)?)?),
                _ => None,
            };
            println!(
                "provisioning {connections} terminals, then {scenario:?} for {duration:?}{}",
                rate.map(|r| format!(" at {r}/s")).unwrap_or_default()
            );
            let report = load::run(LoadOptions {
                iso_addr: cli.iso,
                admin,
                kek,
                connections,
                duration,
                rate,
                scenario,
                packager,
                bin,
                card_admin,
                tls,
                progress: true,
            })
            .await?;
            println!("{report}");
            if report.errors > 0 {
                anyhow::bail!("{} requests failed", report.errors);
            }
        }
    }
    Ok(())
}

fn read_kek(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    hex::decode(
        std::fs::read_to_string(path)
            .with_context(|| format!("failed to read {}", path.display()))?
            .trim(),
    )
    .context("the KEK file must be hex")
}

/// `switchyard-atm web`.
async fn web(cli: Cli) -> anyhow::Result<()> {
    let Command::Web {
        listen,
        terminal,
        tmk_file,
        cards,
        bin,
        offline_issuer_bin,
        currency,
        setup_timeout,
    } = cli.command
    else {
        unreachable!("called for web only");
    };
    let packager = Packager::by_name(&cli.packager)?;
    let admin = match &cli.token_file {
        Some(file) => Some(AdminClient::new(&cli.admin, read_token(file)?)),
        None => None,
    };
    let mut cards = cards
        .iter()
        .map(|c| web::setup::parse_card(c, &currency).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = web::setup::SetupOptions {
        terminal: None,
        bin,
        offline_issuer_bin,
        currency,
        group: "web-atm".into(),
    };
    let (terminal, keys) = match (terminal, tmk_file) {
        (Some(id), Some(tmk_file)) => {
            let tmk = std::fs::read_to_string(&tmk_file)
                .with_context(|| format!("failed to read {}", tmk_file.display()))?;
            let tmk = ClearKey::from_hex(tmk.trim())
                .map_err(|e| anyhow::anyhow!("the TMK file must hold an AES key in hex: {e}"))?;
            if cards.is_empty() {
                let admin = admin
                    .as_ref()
                    .context("no --card given and no --token-file to issue test cards with")?;
                cards = retry(setup_timeout, || {
                    web::setup::provision_cards(admin, &options)
                })
                .await?;
            }
            (TerminalId::new(id)?, TerminalKeys::new(tmk))
        }
        _ => {
            let admin = admin.as_ref().context(
                "--token-file and --kek-file are required to provision a terminal (or give --terminal and --tmk-file)",
            )?;
            let kek = read_kek(
                cli.kek_file
                    .as_ref()
                    .context("--kek-file is required (the switch's KEK in hex)")?,
            )?;
            let provisioned = retry(setup_timeout, || {
                web::setup::provision(admin, &kek, &options)
            })
            .await?;
            cards.extend(provisioned.cards);
            (provisioned.terminal, provisioned.keys)
        }
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    println!(
        "web ATM {terminal} for switch {}: http://{}",
        cli.iso,
        listener.local_addr()?
    );
    let atm = web::WebAtm::new(web::WebAtmConfig {
        iso_addr: cli.iso,
        terminal,
        keys,
        packager,
        cards,
    });
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        switchyard_switch::app::wait_for_signal().await;
        signal.cancel();
    });
    atm.serve(listener, shutdown).await?;
    Ok(())
}

/// Retries `attempt` with a short backoff until it succeeds or `timeout` has passed: at
/// start-up in a cluster the switch's admin API may not answer yet.
async fn retry<T, E, F, Fut>(timeout: Duration, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = std::time::Instant::now() + timeout;
    let mut wait = Duration::from_millis(500);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if std::time::Instant::now() + wait < deadline => {
                eprintln!("setup through the admin API failed ({e}); retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => anyhow::bail!("setup through the admin API failed: {e}"),
        }
    }
}

/// Writes a secret file readable by its owner only.
fn write_private(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

//! `switchyard-switch`: serve | migrate | drain | demo (SPEC §2).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard_switch::settings::Settings;
use switchyard_switch::telemetry::{self, LogFormat};
use switchyard_switch::{app, demo};

#[derive(Debug, Parser)]
#[command(
    name = "switchyard-switch",
    version,
    about = "Switchyard ISO 8583 switch"
)]
struct Cli {
    /// Configuration file (TOML or YAML); every key can be overridden by SWITCHYARD_<SECTION>__<KEY>.
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the ISO 8583, admin and metrics listeners.
    Serve {
        /// Apply pending database migrations before serving.
        #[arg(long)]
        migrate: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run a store-and-forward drainer only (no ISO 8583 listener).
    Drain,
    /// Local quick start: embedded SQLite, seeded terminal and card, a full ATM session.
    Demo(demo::DemoArgs),
    /// Writes a throwaway CA, a server certificate and a client certificate (PEM) for trying
    /// TLS locally: ca.crt, server.crt, server.key, client.crt, client.key. Not for production.
    DevCerts {
        /// Directory to write to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Names (DNS names or IP addresses) the server certificate is valid for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
        /// Common name of the client certificate (e.g. a station or ATM id).
        #[arg(long, default_value = "switchyard-client")]
        client: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its logs stay quiet unless RUST_LOG asks for more.
    let (format, level) = match (&cli.command, cli.log_format) {
        (Command::Demo(_), LogFormat::Auto) => (LogFormat::Text, "warn"),
        (Command::Demo(_), f) => (f, "warn"),
        (_, f) => (f, "info"),
    };
    telemetry::init(format, level);
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
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            write_termination_message(&format!("{err:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Where Kubernetes reads a container's termination message (the pod spec's default
/// `terminationMessagePath`); the operator quotes it in the BankSwitch's Degraded condition.
const TERMINATION_LOG: &str = "/dev/termination-log";

/// Leaves why the switch exited (a malformed LMK or tokens file, an unreachable database) where
/// Kubernetes shows it in `lastState.terminated.message`. Outside a pod the file does not exist
/// and nothing is written; the messages never contain key material (errors name files, not
/// their contents).
fn write_termination_message(message: &str) {
    let path = std::env::var_os("SWITCHYARD_TERMINATION_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(TERMINATION_LOG));
    // Only an existing file: never create /dev entries or stray files on a developer machine.
    if path.exists() {
        // Kubernetes keeps at most 4096 bytes of it.
        let mut text = message.to_owned();
        if text.len() > 4000 {
            let mut cut = 4000;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let _ = std::fs::write(&path, text);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args, cli.config.as_deref()).await,
        Command::DevCerts { out, names, client } => {
            let files = switchyard_switch::tls::dev::write_dev_certs(&out, &names, &client)?;
            println!(
                "wrote a throwaway CA and certificates for {}:\n  {}\n  {} {}\n  {} {}",
                names.join(", "),
                files.ca.display(),
                files.server_cert.display(),
                files.server_key.display(),
                files.client_cert.display(),
                files.client_key.display()
            );
            Ok(())
        }
        Command::Serve { migrate } => {
            let settings = Settings::load(cli.config.as_deref())?;
            app::serve(settings, migrate).await?;
            Ok(())
        }
        Command::Migrate => {
            let settings = Settings::load(cli.config.as_deref())?;
            let store = app::open_store(&settings).await?;
            let before = store.migration_status().await?;
            store.migrate().await?;
            let after = store.migration_status().await?;
            tracing::info!(
                applied_before = ?before.applied,
                applied_now = ?after.applied,
                ran = before.pending,
                "migrations up to date"
            );
            println!(
                "migrations up to date ({} applied now, schema version {})",
                before.pending,
                after.applied.unwrap_or_default()
            );
            Ok(())
        }
        Command::Drain => {
            let settings = Settings::load(cli.config.as_deref())?;
            app::drain(settings).await?;
            Ok(())
        }
    }
}

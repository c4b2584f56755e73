//! `switchyard-switch`: serve | migrate | drain | demo | backup | restore (SPEC §2).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard_switch::settings::Settings;
use switchyard_switch::telemetry::{self, LogFormat};
use switchyard_switch::{app, backup, demo, store};

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
    /// Copies the embedded SQLite database to FILE while the switch keeps serving (one
    /// consistent snapshot, checked). A PostgreSQL store is refused: back it up with pg_dump or
    /// CloudNativePG.
    Backup {
        /// The backup file to write; must not exist.
        #[arg(long)]
        to: PathBuf,
    },
    /// Replaces the embedded SQLite database with a backup. Refuses while any process has the
    /// database open; checks the backup first; keeps the replaced database as
    /// `<db>.pre-restore-<time>`.
    Restore {
        /// The backup file (from `backup` or `[backup] schedule`).
        #[arg(long)]
        from: PathBuf,
    },
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
    // Trace export is configured in the same file as the rest; a file that does not load is
    // reported by the command itself below, so logging starts without export then.
    let export = match &cli.command {
        Command::Serve { .. } | Command::Drain | Command::Migrate => {
            Settings::load(cli.config.as_deref())
                .ok()
                .map(|s| s.telemetry.resolve(|k| std::env::var(k).ok()))
        }
        _ => None,
    };
    let (export, export_error) = match export {
        Some(Ok(export)) => (export, None),
        Some(Err(err)) => (None, Some(err.to_string())),
        None => (None, None),
    };
    let mut telemetry = match telemetry::init(format, level, export.as_ref()) {
        Ok(t) => t,
        Err(err) => {
            eprintln!("error: {err}");
            write_termination_message(&err.to_string());
            return ExitCode::FAILURE;
        }
    };
    if let Some(err) = export_error {
        tracing::error!("{err}");
        eprintln!("error: {err}");
        write_termination_message(&err);
        return ExitCode::FAILURE;
    }
    if let Some(export) = &export {
        tracing::info!(
            endpoint = %export.endpoint,
            sample_ratio = export.sample_ratio,
            "exporting traces over OTLP/HTTP"
        );
    }
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
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            write_termination_message(&format!("{err:#}"));
            ExitCode::FAILURE
        }
    };
    drop(runtime);
    // the last spans go out before the process exits (bounded wait)
    telemetry.shutdown();
    code
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
        Command::Backup { to } => {
            let settings = Settings::load(cli.config.as_deref())?;
            let db = backup::sqlite_path(&settings.database.resolve_url()?)?;
            // a restore cannot swap the database under the copy
            let _lock = backup::DatabaseLock::shared(&db)?;
            let report =
                tokio::task::spawn_blocking(move || backup::backup_database(&db, &to)).await??;
            println!(
                "backed up to {} ({} bytes, schema version {}, {} ms)",
                report.path.display(),
                report.bytes,
                report
                    .schema_version
                    .map_or_else(|| "none".to_string(), |v| v.to_string()),
                report.duration.as_millis()
            );
            Ok(())
        }
        Command::Restore { from } => {
            let settings = Settings::load(cli.config.as_deref())?;
            let db = backup::sqlite_path(&settings.database.resolve_url()?)?;
            let known = store::embedded_migration_versions(store::Backend::Sqlite);
            let target = db.clone();
            let report = tokio::task::spawn_blocking(move || {
                backup::restore_database(&target, &from, &known)
            })
            .await??;
            tracing::info!(
                db = %db.display(),
                schema_version = report.schema_version,
                pending_migrations = report.pending_migrations,
                "database restored"
            );
            println!(
                "restored {} (schema version {})",
                db.display(),
                report.schema_version
            );
            if let Some(previous) = &report.previous {
                println!(
                    "the replaced database is kept as {} (delete it once the restored switch is verified)",
                    previous.display()
                );
            }
            if report.pending_migrations > 0 {
                println!(
                    "{} migrations of this binary are not applied yet: run `switchyard-switch migrate` (the operator's migration Job does) or `serve --migrate`",
                    report.pending_migrations
                );
            }
            Ok(())
        }
        Command::Migrate => {
            let settings = Settings::load(cli.config.as_deref())?;
            let _lock = backup::DatabaseLock::for_store_url(&settings.database.resolve_url()?)?;
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

//! The command line: `run` the daemon, or `check-config` before deploying.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Receives Sinch postbacks, commits them durably, delivers them to internal webhooks.
#[derive(Debug, Parser)]
#[command(name = "postback-relay", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "RELAY_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    Run {
        /// The YAML config file (`RELAY_*` environment variables override it).
        #[arg(long, short, default_value = "config/relay.yaml")]
        config: PathBuf,
    },
    /// Load and validate a config file, print a summary, and exit (non-zero if invalid).
    CheckConfig {
        /// The YAML config file.
        #[arg(long, short, default_value = "config/relay.yaml")]
        config: PathBuf,
    },
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Runs the parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    init_logging(cli.log_format);
    for name in crate::config::unrecognized_env_overrides() {
        tracing::warn!(variable = %name, "ignoring environment variable: RELAY_ prefix but no such config key");
    }
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(loaded) => {
                println!(
                    "{}: OK ({} targets, {} routes, store {} with sync={})",
                    config.display(),
                    loaded.targets.len(),
                    loaded.routes.len(),
                    loaded.store.path.display(),
                    loaded.store.sync
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let loaded = match Config::load(&config) {
                Ok(loaded) => loaded,
                Err(err) => {
                    eprintln!("{err}");
                    return ExitCode::from(2);
                }
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("cannot start the tokio runtime");
            match runtime.block_on(run(loaded)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    eprintln!("postback-relay: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Starts the relay and stops it gracefully on SIGTERM or SIGINT.
async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before anything starts, so a SIGTERM during start-up drains too.
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let relay = Arc::new(crate::relay::start(config).await?);
    let token: CancellationToken = relay.shutdown_token();
    let signals = tokio::spawn({
        let relay = relay.clone();
        async move {
            loop {
                tokio::select! {
                    _ = hangup.recv() => relay.reload(),
                    _ = terminate.recv() => break,
                    _ = interrupt.recv() => break,
                }
            }
            tracing::info!("shutdown requested; draining");
            token.cancel();
        }
    });
    let result = relay.stopped().await;
    signals.abort();
    result
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // Without the module path: delivery events carry their own `target`
        // field, and a flattened line must not hold the key twice.
        LogFormat::Json => builder.json().flatten_event(true).with_target(false).init(),
    }
}

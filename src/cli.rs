//! The command line: `run` the daemon, `check-config` and `route` (a dry-run of
//! the routing rules) before deploying; `targets`, `pause`, `resume`, `dlq` and
//! `quarantine` steer a running relay through its admin API (see [`crate::ops`]);
//! `simulate` plays the aggregator against a deployment.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::logging::LogGuard;
use crate::routing::Router;

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
    /// Run the relay until SIGTERM or SIGINT (SIGHUP reloads targets, routes, access rules and the TLS certificate).
    Run {
        /// The YAML config file (`RELAY_*` environment variables override it).
        #[arg(long, short, default_value = "config/relay.yaml")]
        config: PathBuf,
        /// Also reload when the config file's contents change (checked every second).
        #[arg(long)]
        watch: bool,
    },
    /// Load and validate a config file, print a summary, and exit (non-zero if invalid).
    CheckConfig {
        /// The YAML config file.
        #[arg(long, short, default_value = "config/relay.yaml")]
        config: PathBuf,
    },
    /// Dry-run: parse a postback from standard input and print its envelope
    /// and the targets it would be delivered to, and why. Stores nothing.
    Route {
        /// The YAML config file whose routes are tried.
        #[arg(long, short, default_value = "config/relay.yaml")]
        config: PathBuf,
        /// The Content-Type Sinch would send (a hint; the body is sniffed).
        #[arg(long)]
        content_type: Option<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Behave like the aggregator: send sample postbacks (or the given
    /// files) serially over one keep-alive connection, retry failures like
    /// Sinch does, and print a summary. Exit 1 if any postback was given up.
    Simulate(crate::simulate::SimulateOptions),
    /// Exit 0 if the relay on this config's admin listener is ready, 1 if not:
    /// for container HEALTHCHECKs and scripts.
    Health {
        /// The relay's config file (for `admin_listen`).
        #[arg(long, short, default_value = "config/relay.yaml")]
        config: PathBuf,
        /// Ask `/healthz` (alive) instead of `/readyz` (ready to accept).
        #[arg(long)]
        live: bool,
    },
    /// `targets`, `pause`, `resume`, `dlq ...`, `quarantine ...`: a running
    /// relay's admin API.
    #[command(flatten)]
    Ops(crate::ops::OpsCommand),
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Runs the parsed command line and returns the process exit code: 0 on
/// success, 2 for a bad config or bad arguments, 1 for anything else.
pub fn main(cli: Cli) -> ExitCode {
    restrict_new_files();
    let _flush_logs_at_exit = init_logging(cli.log_format);
    for name in crate::config::unrecognized_env_overrides() {
        tracing::warn!(variable = %name, "ignoring environment variable: RELAY_ prefix but no such config key");
    }
    let outcome = match cli.command {
        Command::CheckConfig { config: path } => with_config(&path, |config| {
            println!(
                "{}: OK ({} targets, {} routes, store {})",
                path.display(),
                config.targets.len(),
                config.routes.len(),
                config.store.describe()
            );
            Ok(ExitCode::SUCCESS)
        }),
        Command::Run {
            config: path,
            watch,
        } => with_config(&path, |config| {
            block_on(run(config, &path, watch)).map(|()| ExitCode::SUCCESS)
        }),
        Command::Route {
            config,
            content_type,
            json,
        } => with_config(&config, |config| {
            dry_run(&config, content_type.as_deref(), json)
        }),
        Command::Health { config, live } => {
            with_config(&config, |config| block_on(health(&config, live)))
        }
        // The only command that needs no config: it talks to a URL.
        Command::Simulate(options) => block_on(simulate(options)),
        // Prints its own errors: the exit code tells a refusal (1) from bad arguments (2).
        Command::Ops(command) => Ok(crate::ops::run(command)),
    };
    outcome.unwrap_or_else(|err| {
        tracing::error!("{err:#}");
        eprintln!("postback-relay: {err:#}");
        ExitCode::FAILURE
    })
}

/// Files this process creates (the store, its journal, a file target's
/// lines: phone numbers and message texts) are readable by its user only:
/// 0600 for files and 0700 for directories, whatever umask it was started
/// with. Set first, before anything is opened.
fn restrict_new_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Loads the config and runs `work` with it; an invalid config prints its
/// error (naming the file and the key) and exits 2.
fn with_config(
    path: &std::path::Path,
    work: impl FnOnce(Config) -> anyhow::Result<ExitCode>,
) -> anyhow::Result<ExitCode> {
    match Config::load(path) {
        Ok(config) => work(config),
        Err(err) => {
            eprintln!("{err}");
            Ok(ExitCode::from(2))
        }
    }
}

/// `route`: what the relay would do with the postback on standard input.
/// Exit 0 when it parses, 1 when the relay would answer 400 (and quarantine it).
fn dry_run(config: &Config, content_type: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
        .context("cannot read standard input")?;
    let postback = match crate::postback::parse(&body, content_type) {
        Ok(postback) => postback,
        Err(err) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "error": err.to_string(), "answer": 400 })
                );
            } else {
                println!(
                    "not a postback: {err}
the relay would answer 400 and keep the body in the quarantine"
                );
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let decision = Router::new(config).route(&postback);
    let envelope = crate::envelope::Envelope::new(
        &postback,
        ulid::Ulid::generate().to_string(),
        &config.envelope.source,
        chrono::Utc::now(),
    );
    if json {
        let report = serde_json::json!({
            "envelope": envelope,
            "routes": decision.routes,
            "targets": decision.targets,
        });
        println!("{report}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("envelope (the id and receive time are examples):");
    println!(
        "{}",
        serde_json::to_string_pretty(&envelope).context("serialize the envelope")?
    );
    if decision.targets.is_empty() {
        println!("no route matches: the relay would answer 200 and keep it as a dead letter (\"no route\")");
    } else {
        println!("routes matched: {}", decision.routes.join(", "));
        println!("delivered to:   {}", decision.targets.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `health`: one GET to the admin listener, bounded to 5 s.
async fn health(config: &Config, live: bool) -> anyhow::Result<ExitCode> {
    let mut admin = config.admin_listen;
    if admin.ip().is_unspecified() {
        // Listening on every address: ask over loopback.
        admin.set_ip(match admin {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url: hyper::Uri =
        format!("http://{admin}/{}", if live { "healthz" } else { "readyz" }).parse()?;
    let client = crate::delivery::build_client()?;
    let request =
        hyper::Request::get(url.clone()).body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let answer =
        tokio::time::timeout(std::time::Duration::from_secs(5), client.request(request)).await;
    let (healthy, said) = match answer {
        Ok(Ok(response)) => (
            response.status() == hyper::StatusCode::OK,
            response.status().to_string(),
        ),
        Ok(Err(err)) => (false, err.to_string()),
        Err(_) => (false, "no answer within 5 s".to_owned()),
    };
    println!("{url}: {said}");
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `simulate`: sends, then prints the summary.
async fn simulate(options: crate::simulate::SimulateOptions) -> anyhow::Result<ExitCode> {
    let summary = crate::simulate::run(&options).await?;
    let ms = |d: Option<std::time::Duration>| {
        d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{} postbacks to {}: {} accepted, {} retries, {} given up",
        summary.postbacks, options.url, summary.accepted, summary.retried, summary.given_up
    );
    println!(
        "answer time: p50 {}, p90 {}, p99 {}, max {} ({} requests)",
        ms(summary.percentile(50.0)),
        ms(summary.percentile(90.0)),
        ms(summary.percentile(99.0)),
        ms(summary.answer_times.last().copied()),
        summary.answer_times.len()
    );
    for failure in &summary.failures {
        println!("failure: {failure}");
    }
    Ok(if summary.given_up == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?
        .block_on(work)
}

/// Starts the relay and stops it gracefully on SIGTERM or SIGINT; SIGHUP
/// (and with `watch`, a change of the file's contents) re-reads the TLS
/// certificate and `path` (see [`crate::relay::RelayHandle::reload_config`]).
async fn run(config: Config, path: &std::path::Path, watch: bool) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before anything starts, so a SIGTERM during start-up drains too.
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    // What `--watch` compares with: the file as it was before the start.
    let baseline = if watch {
        crate::watch::digest(path).await
    } else {
        None
    };
    let relay = Arc::new(crate::relay::start(config).await?);
    let token: CancellationToken = relay.shutdown_token();
    let watcher = watch.then(|| {
        let relay = relay.clone();
        let path = path.to_owned();
        tracing::info!(file = %path.display(), "watching the config file for changes");
        tokio::spawn(crate::watch::watch_file(
            path.clone(),
            crate::watch::POLL_EVERY,
            token.clone(),
            baseline,
            move || reload(&relay, &path),
        ))
    });
    let signals = tokio::spawn({
        let relay = relay.clone();
        let path = path.to_owned();
        async move {
            loop {
                tokio::select! {
                    _ = hangup.recv() => reload(&relay, &path),
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
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    result
}

/// Re-reads the TLS certificate and the config file; a file that does not
/// load or validate is refused and the running config stays.
fn reload(relay: &crate::relay::RelayHandle, path: &std::path::Path) {
    relay.reload();
    match Config::load(path) {
        Ok(new) => drop(relay.reload_config(&new)),
        Err(err) => relay.reload_failed(&err.to_string()),
    }
}

/// Logs go to stderr in batches (see `logging`): a log line costs the
/// request that writes it an append to a buffer. The returned guard writes
/// what is left when it is dropped, at the end of `main`.
fn init_logging(format: LogFormat) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let guard = LogGuard::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(guard.writer());
    match format {
        LogFormat::Text => builder.init(),
        // Without the module path: delivery events carry their own `target`
        // field, and a flattened line must not hold the key twice.
        LogFormat::Json => builder.json().flatten_event(true).with_target(false).init(),
    }
    guard
}

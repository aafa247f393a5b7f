//! Wiring and lifetime: opens the store, starts one dispatcher per target and
//! the two listeners, and shuts them down in the order that loses nothing:
//! stop accepting → finish requests in flight → let deliveries in flight end →
//! close the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::access::AccessPolicy;
use crate::admin::Admin;
use crate::config::Config;
use crate::delivery::build_client;
use crate::delivery::fleet::{DeliveryRuntime, Fleet, TargetChanges, TARGET_REMOVED};
use crate::http_server::{serve, ServeOptions};
use crate::ingest::Ingest;
use crate::live::Live;
use crate::load::IngestLoad;
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::store::{self, Committer, OperatorStore};
use crate::tls::TlsReloader;

/// How often the queue gauges are read from the store.
const GAUGE_REFRESH: Duration = Duration::from_secs(2);
/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A started relay: its bound addresses and the means to stop it.
pub struct RelayHandle {
    /// Where the public listener is bound (useful with port 0).
    pub ingest_addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    tls: Option<Arc<TlsReloader>>,
    live: LiveConfig,
    task: std::sync::Mutex<Option<JoinHandle<anyhow::Result<()>>>>,
}

/// What a config reload may replace while the relay runs, and what it is
/// compared with to report the settings that need a restart.
struct LiveConfig {
    started_with: Config,
    router: Arc<Live<Router>>,
    access: Arc<Live<AccessPolicy>>,
    admin_token: Arc<Live<Option<String>>>,
    fleet: Arc<Fleet>,
    metrics: Metrics,
}

impl RelayHandle {
    /// Starts a graceful shutdown and waits for it to finish.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.stopped().await
    }

    /// Waits until the relay has stopped (after its shutdown token fired).
    /// Only the first caller waits; later ones return at once.
    pub async fn stopped(&self) -> anyhow::Result<()> {
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        match task {
            Some(task) => task.await.context("relay task panicked")?,
            None => Ok(()),
        }
    }

    /// Re-reads what can change without a restart (SIGHUP): the TLS
    /// certificate. New connections get it; open ones are not disturbed.
    pub fn reload(&self) {
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(err) => {
                    tracing::error!(error = %err, "TLS reload failed; keeping the current certificate")
                }
            }
        }
    }

    /// Applies a new, already validated config: targets (new ones start,
    /// changed ones get a new dispatcher, removed ones are drained and their
    /// jobs dead-lettered), routes, the ingest access rules (allowlist,
    /// trusted proxies, credentials) and the admin token take effect for the
    /// next request; requests and deliveries in flight are not disturbed.
    /// Returns the keys that changed but need a restart.
    pub fn reload_config(&self, new: &Config) -> Result<Vec<&'static str>, String> {
        let live = &self.live;
        let outcome = (|| {
            let access = AccessPolicy::new(&new.ingest)?;
            let admin_token = new
                .admin
                .token()
                .map_err(|err| format!("admin.token_file: {err}"))?;
            // New targets run before routes may send them jobs; removed ones
            // drain while the new routes already send them nothing.
            let changes = live.fleet.apply(new);
            live.router.set(Router::new(new));
            live.access.set(access);
            live.admin_token.set(admin_token);
            log_target_changes(&changes);
            Ok(restart_needed(&live.started_with, new))
        })();
        let result = if outcome.is_ok() {
            "applied"
        } else {
            "refused"
        };
        live.metrics
            .config_reloads
            .with_label_values(&[result])
            .inc();
        match &outcome {
            Ok(keys) if keys.is_empty() => {
                tracing::info!("config reloaded: targets, routes and access rules applied")
            }
            Ok(keys) => tracing::warn!(needs_restart = %keys.join(","),
                "config reloaded: targets, routes and access rules applied; other changed settings take effect after a restart"),
            Err(err) => {
                tracing::error!(error = %err, "config reload refused; the running config stays")
            }
        }
        outcome
    }

    /// Counts a reload whose file did not even load (syntax, unknown key).
    pub fn reload_failed(&self, error: &str) {
        self.live
            .metrics
            .config_reloads
            .with_label_values(&["refused"])
            .inc();
        tracing::error!(error, "config reload refused; the running config stays");
    }

    /// The token that stops the relay when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Binds both listeners, opens the store and starts everything.
pub async fn start(config: Config) -> anyhow::Result<RelayHandle> {
    let ingest_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (key `listen`)", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (key `admin_listen`)",
                config.admin_listen
            )
        })?;
    let ingest_addr = ingest_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let store: Arc<dyn OperatorStore> = store::open(&config)
        .await
        .with_context(|| format!("cannot open the store ({})", config.store.describe()))?;
    let metrics = Metrics::new();
    let config_for_reload = config.clone();
    let client = build_client().context("cannot load the system's TLS root certificates")?;
    dead_letter_removed_targets(store.as_ref(), &config).await;
    let delivery_runtime = DeliveryRuntime::start().context("cannot start the delivery runtime")?;
    let ingest_load = Arc::new(IngestLoad::default());
    let fleet = Arc::new(
        Fleet::start(
            &config,
            store.clone(),
            metrics.clone(),
            client,
            delivery_runtime,
            ingest_load.clone(),
        )
        .await
        .context("cannot read the targets' pauses from the store")?,
    );
    // The store hands freshly committed jobs straight to the dispatchers.
    let committer = Committer::new(store.clone(), fleet.clone());
    let admin_token = Arc::new(Live::new(config.admin.token().map_err(anyhow::Error::msg)?));
    if admin_token.get().is_none() {
        tracing::warn!("admin.token_file is not set: the admin API (/api/v1/) is off; the admin listener serves only metrics and health");
    }
    let shutdown = CancellationToken::new();
    let access = Arc::new(Live::new(
        AccessPolicy::new(&config.ingest).map_err(anyhow::Error::msg)?,
    ));
    if access.get().allows_everyone() {
        tracing::warn!(
            "ingest.allow is empty: any address may post; set it to Sinch's source addresses"
        );
    }
    let tls = match &config.tls {
        Some(tls) => Some(Arc::new(
            TlsReloader::new(tls.cert.clone(), tls.key.clone()).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    let ingest_options = ServeOptions {
        idle_timeout: config.ingest.idle_timeout.0,
        header_read_timeout: config.ingest.header_read_timeout.0,
        max_connections: config.ingest.max_connections,
        max_connections_per_source: Some(config.ingest.max_connections_per_source.get()),
        max_concurrent_streams: config.ingest.max_concurrent_streams.get(),
        drain_timeout: DRAIN_TIMEOUT,
        access: Some(access.clone()),
        proxy_protocol: config.ingest.proxy_protocol,
        tls: tls.clone(),
    };
    // The admin listener has no allowlist (it is bound to a private address)
    // and no per-source cap (scrapers and operators share a host).
    let admin_options = ServeOptions {
        max_connections_per_source: None,
        access: None,
        proxy_protocol: false,
        tls: None,
        ..ingest_options.clone()
    };

    let router = Arc::new(Live::new(Router::new(&config)));
    let ingest = Arc::new(Ingest {
        path: config.ingest.path.clone(),
        max_body_bytes: config.ingest.max_body_bytes,
        body_read_timeout: config.ingest.body_read_timeout.0,
        access: access.clone(),
        source: config.envelope.source.clone(),
        router: router.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        committer: committer.clone(),
        load: ingest_load,
    });
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        store: store.clone(),
        token: admin_token.clone(),
        fleet: fleet.clone(),
        committer,
        router: router.clone(),
        source: config.envelope.source.clone(),
    });

    tracing::info!(
        ingest = %ingest_addr, admin = %admin_addr, path = %config.ingest.path,
        tls = config.tls.is_some(),
        store = %config.store.describe(),
        targets = config.targets.len(), routes = config.routes.len(),
        "postback-relay listening"
    );

    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        let fleet = fleet.clone();
        let metrics = metrics.clone();
        async move {
            let deliveries = CancellationToken::new();
            let gauges = tokio::spawn(refresh_gauges(
                store.clone(),
                metrics.clone(),
                fleet.clone(),
                deliveries.clone(),
            ));
            let ingest_server = serve(
                "ingest",
                ingest_listener,
                move |request, connection| ingest.clone().handle(request, connection),
                ingest_options,
                metrics.clone(),
                shutdown.clone(),
            );
            let admin_server = serve(
                "admin",
                admin_listener,
                move |request, _connection| admin.clone().handle(request),
                admin_options,
                metrics.clone(),
                shutdown.clone(),
            );
            tokio::join!(ingest_server, admin_server);
            tracing::info!("listeners closed; finishing deliveries in flight");
            deliveries.cancel();
            fleet.shutdown().await;
            let _ = gauges.await;
            store.close().await.context("closing the store")?;
            tracing::info!("stopped cleanly");
            Ok(())
        }
    });
    Ok(RelayHandle {
        ingest_addr,
        admin_addr,
        shutdown,
        tls,
        live: LiveConfig {
            started_with: config_for_reload,
            router,
            access,
            admin_token,
            fleet,
            metrics,
        },
        task: std::sync::Mutex::new(Some(task)),
    })
}

/// Settings that differ between `old` and `new` but are only read at start.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let (a, b) = (&old.ingest, &new.ingest);
    let checks: [(&'static str, bool); 7] = [
        ("listen", old.listen != new.listen),
        ("admin_listen", old.admin_listen != new.admin_listen),
        ("tls", old.tls != new.tls),
        ("store", old.store != new.store),
        ("envelope", old.envelope != new.envelope),
        ("ingest.path", a.path != b.path),
        (
            "ingest (limits and timeouts)",
            (
                a.max_body_bytes,
                a.dedupe_window,
                a.idle_timeout,
                a.header_read_timeout,
                a.body_read_timeout,
                a.max_connections,
                a.max_connections_per_source,
                a.max_concurrent_streams,
                a.proxy_protocol,
            ) != (
                b.max_body_bytes,
                b.dedupe_window,
                b.idle_timeout,
                b.header_read_timeout,
                b.body_read_timeout,
                b.max_connections,
                b.max_connections_per_source,
                b.max_concurrent_streams,
                b.proxy_protocol,
            ),
        ),
    ];
    for (key, changed) in checks {
        if changed {
            keys.push(key);
        }
    }
    keys
}

/// Jobs queued for a target the config no longer has would wait forever:
/// they become dead letters ("target removed"), kept for a replay once the
/// target is configured again — as a reload that removes a target does.
async fn dead_letter_removed_targets(store: &dyn OperatorStore, config: &Config) {
    let stats = match store.stats().await {
        Ok(stats) => stats,
        Err(err) => {
            tracing::warn!(error = %err, "cannot look for jobs of removed targets");
            return;
        }
    };
    for stat in stats {
        if stat.pending > 0 && !config.targets.contains_key(&stat.target) {
            match store.dead_letter_target(&stat.target, TARGET_REMOVED).await {
                Ok(moved) => tracing::warn!(target = %stat.target, jobs = moved,
                    "jobs were queued for a target that is not in the config; kept as dead letters (reason \"target removed\"): replay them once it is back"),
                Err(err) => tracing::error!(target = %stat.target, error = %err,
                    "jobs are queued for a target that is not in the config and could not be dead-lettered"),
            }
        }
    }
}

/// Says what a reload did to the targets.
fn log_target_changes(changes: &TargetChanges) {
    for name in &changes.started {
        tracing::info!(target = %name, "target added");
    }
    for name in &changes.replaced {
        tracing::info!(target = %name, "target settings changed; attempts in flight finish with the old ones");
    }
    for name in &changes.removed {
        tracing::warn!(target = %name, "target removed; attempts in flight finish, then its queued jobs become dead letters");
    }
}

/// Keeps `relay_queue_pending`, `relay_dead_letters` and
/// `relay_journal_damaged_segments` close to the store's truth, follows pauses made by other instances, and probes a store that
/// failed so `/readyz` recovers without traffic.
async fn refresh_gauges(
    store: Arc<dyn OperatorStore>,
    metrics: Metrics,
    fleet: Arc<Fleet>,
    shutdown: CancellationToken,
) {
    loop {
        if !store.is_ready() {
            // The outcome is recorded in the ready flag by the store itself.
            let _ = store.probe().await;
        }
        metrics
            .journal_damaged_segments
            .set(store.damaged_journal_segments() as i64);
        match store.stats().await {
            Ok(stats) => metrics.set_queue(&fleet.targets(), &stats),
            Err(err) => tracing::warn!(error = %err, "cannot read queue figures"),
        }
        match store.quarantine_usage().await {
            Ok(usage) => metrics.set_quarantine(usage),
            Err(err) => tracing::warn!(error = %err, "cannot read the quarantine's size"),
        }
        let epoch = fleet.pause_epoch();
        match store.paused_targets().await {
            Ok(paused) => fleet.sync_pauses(&paused, epoch),
            Err(err) => tracing::warn!(error = %err, "cannot read the targets' pauses"),
        }
        tokio::select! {
            () = tokio::time::sleep(GAUGE_REFRESH) => {},
            () = shutdown.cancelled() => return,
        }
    }
}

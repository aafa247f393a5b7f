//! The operator's commands on a running relay: `targets`, `pause`, `resume`,
//! `dlq list|show|replay|purge` and `quarantine list|show|replay|purge`. Each
//! is one call (or, for `--all-pages`, a few) to the relay's admin API
//! (docs/admin-api.md) through [`Client`], which answers the API's own types
//! (`crate::admin::model`), printed as an aligned table or as JSON.
//! Nothing here opens the store: the relay answers, so the command line sees
//! what the API sees, on either backend and beside any number of instances.

mod client;
mod render;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::admin::model::{
    DeadLetterPage, DeadLetterQuery, DeadLetterSelection, PageQuery, QuarantinePage,
    QuarantineSelection, TimeArg,
};
pub use client::Client;

/// The operator's commands, flattened into the top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Show every target's queue on a running relay: pending and due jobs,
    /// dead letters, the oldest pending job's age, the last error.
    Targets(ApiOptions),
    /// Stop delivering to TARGET (it keeps queueing) until `resume`; the pause
    /// is stored, so it survives restarts and holds for every instance.
    Pause(TargetArgs),
    /// Deliver to a paused TARGET again.
    Resume(TargetArgs),
    /// Dead letters: postbacks a target was given up for.
    Dlq {
        /// What to do with them.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Bodies the parser refused (answered 400), one per distinct body.
    Quarantine {
        /// What to do with them.
        #[command(subcommand)]
        action: QuarantineAction,
    },
}

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters, oldest first, a page at a time.
    List(DlqListArgs),
    /// One dead letter with the envelope its target would receive and the
    /// original body.
    Show(DlqShowArgs),
    /// Put dead letters back into their target's queue with fresh attempts.
    Replay(DlqSelectArgs),
    /// Delete dead letters for good.
    Purge(DlqSelectArgs),
}

/// `quarantine` subcommands.
#[derive(Debug, Subcommand)]
pub enum QuarantineAction {
    /// List quarantined bodies, oldest first arrival first, a page at a time.
    List(QuarantineListArgs),
    /// One quarantined body, with the body itself.
    Show(QuarantineShowArgs),
    /// Parse bodies again with today's parser; those that parse are routed and
    /// committed like new postbacks and leave the quarantine.
    Replay(QuarantineSelectArgs),
    /// Delete quarantined bodies for good.
    Purge(QuarantineSelectArgs),
}

/// Where the relay's admin API is, and how to print its answers: every
/// operator command takes these.
#[derive(Debug, Clone, Args)]
pub struct ApiOptions {
    /// The relay's config file: its `admin_listen` and `admin.token_file`
    /// (not read when both --admin and --token-file are given).
    #[arg(long, short, default_value = "config/relay.yaml")]
    pub config: PathBuf,
    /// The admin listener's URL (e.g. http://10.0.0.7:9090), instead of the
    /// config's `admin_listen`.
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// A file holding the admin token, instead of the config's `admin.token_file`.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `pause` and `resume`: one target.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The target's name in the relay's config.
    pub target: String,
    /// Connection and output.
    #[command(flatten)]
    pub api: ApiOptions,
}

/// A time window; each bound is inclusive and optional.
#[derive(Debug, Args)]
pub struct TimeRange {
    /// From TIME on (RFC 3339 or Unix milliseconds): when a dead letter was
    /// given up, when a body last arrived.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Up to TIME (RFC 3339 or Unix milliseconds).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

/// Which dead letters a listing or a filter means.
#[derive(Debug, Args)]
pub struct DeadLetterFilterArgs {
    /// Only this target's (e.g. `crm`, or `(no route)`).
    #[arg(long)]
    pub target: Option<String>,
    /// Only this reason, exactly (e.g. `rejected by target`).
    #[arg(long)]
    pub reason: Option<String>,
    /// When they were given up.
    #[command(flatten)]
    pub range: TimeRange,
}

/// One page of a listing, or all of them.
#[derive(Debug, Args)]
pub struct PageArgs {
    /// Items per page (the API's default when not given).
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Start after this cursor (the `more: --after ...` of the previous page).
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
    /// Follow the cursor to the last page and print everything.
    #[arg(long)]
    pub all_pages: bool,
}

/// `dlq list`.
#[derive(Debug, Args)]
pub struct DlqListArgs {
    /// Which dead letters.
    #[command(flatten)]
    pub filter: DeadLetterFilterArgs,
    /// Which page.
    #[command(flatten)]
    pub page: PageArgs,
    /// Connection and output.
    #[command(flatten)]
    pub api: ApiOptions,
}

/// `dlq show`.
#[derive(Debug, Args)]
pub struct DlqShowArgs {
    /// The dead letter's id (the ID column of `dlq list`).
    pub id: u64,
    /// Connection and output.
    #[command(flatten)]
    pub api: ApiOptions,
}

/// `dlq replay` and `dlq purge`: dead letters by id, by filter, or all of
/// them; exactly one of the three, so nothing is chosen by accident.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which")
    .required(true)
    .multiple(true)
    .args(["ids", "target", "reason", "since", "until", "all"])))]
pub struct DlqSelectArgs {
    /// Dead letter ids.
    #[arg(conflicts_with_all = ["target", "reason", "since", "until"])]
    pub ids: Vec<u64>,
    /// Or those the filter matches.
    #[command(flatten)]
    pub filter: DeadLetterFilterArgs,
    /// Or every dead letter.
    #[arg(long, conflicts_with_all = ["ids", "target", "reason", "since", "until"])]
    pub all: bool,
    /// Connection and output.
    #[command(flatten)]
    pub api: ApiOptions,
}

/// `quarantine list`.
#[derive(Debug, Args)]
pub struct QuarantineListArgs {
    /// When the bodies last arrived.
    #[command(flatten)]
    pub range: TimeRange,
    /// Which page.
    #[command(flatten)]
    pub page: PageArgs,
    /// Connection and output.
    #[command(flatten)]
    pub api: ApiOptions,
}

/// `quarantine show`.
#[derive(Debug, Args)]
pub struct QuarantineShowArgs {
    /// The body's SHA-256 (the HASH column of `quarantine list`).
    pub hash: String,
    /// Connection and output.
    #[command(flatten)]
    pub api: ApiOptions,
}

/// `quarantine replay` and `quarantine purge`: bodies by hash, by time, or
/// all of them; exactly one of the three.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which")
    .required(true)
    .multiple(true)
    .args(["hashes", "since", "until", "all"])))]
pub struct QuarantineSelectArgs {
    /// Body hashes.
    #[arg(conflicts_with_all = ["since", "until"])]
    pub hashes: Vec<String>,
    /// Or those that last arrived in this window.
    #[command(flatten)]
    pub range: TimeRange,
    /// Or every quarantined body.
    #[arg(long, conflicts_with_all = ["hashes", "since", "until"])]
    pub all: bool,
    /// Connection and output.
    #[command(flatten)]
    pub api: ApiOptions,
}

/// Why an operator command failed; it decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Bad arguments or config: exit 2.
    #[error("{0}")]
    Usage(String),
    /// The relay answered an error or could not be reached: exit 1.
    #[error("{0}")]
    Relay(String),
}

/// Runs an operator command and returns the exit code: 0 done, 1 the relay
/// answered an error or could not be reached, 2 bad arguments or config.
pub fn run(command: OpsCommand) -> ExitCode {
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| OpsError::Relay(format!("cannot start the tokio runtime: {err}")))
        .and_then(|runtime| runtime.block_on(execute(command)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("postback-relay: {err}");
            match err {
                OpsError::Usage(_) => ExitCode::from(2),
                OpsError::Relay(_) => ExitCode::FAILURE,
            }
        }
    }
}

async fn execute(command: OpsCommand) -> Result<(), OpsError> {
    match command {
        OpsCommand::Targets(api) => {
            let answer = Client::locate(&api)?.targets().await?;
            print(&api, &answer, render::targets)
        }
        OpsCommand::Pause(args) => set_paused(&args, true).await,
        OpsCommand::Resume(args) => set_paused(&args, false).await,
        OpsCommand::Dlq { action } => dead_letters(action).await,
        OpsCommand::Quarantine { action } => quarantine(action).await,
    }
}

async fn set_paused(args: &TargetArgs, paused: bool) -> Result<(), OpsError> {
    let client = Client::locate(&args.api)?;
    let answer = client.set_paused(&args.target, paused).await?;
    print(&args.api, &answer, render::pause_line)
}

async fn dead_letters(action: DlqAction) -> Result<(), OpsError> {
    match action {
        DlqAction::List(args) => {
            let client = &Client::locate(&args.api)?;
            let query = DeadLetterQuery {
                target: args.filter.target.clone(),
                reason: args.filter.reason.clone(),
                page: args.page.query(&args.filter.range),
            };
            let answer = pages(
                query,
                args.page.all_pages,
                |q| &mut q.page.after,
                |q| async move { client.dead_letters(&q).await },
            )
            .await?;
            print(&args.api, &answer, render::dead_letters)
        }
        DlqAction::Show(args) => {
            let answer = Client::locate(&args.api)?.dead_letter(args.id).await?;
            print(&args.api, &answer, render::dead_letter)
        }
        DlqAction::Replay(args) => {
            let client = Client::locate(&args.api)?;
            let answer = client.replay_dead_letters(&args.selection()?).await?;
            print(&args.api, &answer, render::dead_letters_replayed)
        }
        DlqAction::Purge(args) => {
            let client = Client::locate(&args.api)?;
            let answer = client.purge_dead_letters(&args.selection()?).await?;
            print(&args.api, &answer, render::purged)
        }
    }
}

async fn quarantine(action: QuarantineAction) -> Result<(), OpsError> {
    match action {
        QuarantineAction::List(args) => {
            let client = &Client::locate(&args.api)?;
            let query = args.page.query(&args.range);
            let answer = pages(
                query,
                args.page.all_pages,
                |q| &mut q.after,
                |q| async move { client.quarantine(&q).await },
            )
            .await?;
            print(&args.api, &answer, render::quarantine)
        }
        QuarantineAction::Show(args) => {
            let answer = Client::locate(&args.api)?.quarantined(&args.hash).await?;
            print(&args.api, &answer, render::quarantined)
        }
        QuarantineAction::Replay(args) => {
            let client = Client::locate(&args.api)?;
            let answer = client.replay_quarantine(&args.selection()).await?;
            print(&args.api, &answer, render::quarantine_replayed)
        }
        QuarantineAction::Purge(args) => {
            let client = Client::locate(&args.api)?;
            let answer = client.purge_quarantine(&args.selection()).await?;
            print(&args.api, &answer, render::purged)
        }
    }
}

/// Prints the answer as JSON (`--json`) or through `render`.
fn print<T: Serialize>(
    options: &ApiOptions,
    answer: &T,
    render: fn(&T) -> String,
) -> Result<(), OpsError> {
    if options.json {
        let json = serde_json::to_value(answer)
            .map_err(|err| OpsError::Relay(format!("cannot print the answer: {err}")))?;
        println!("{json:#}");
    } else {
        print!("{}", render(answer));
    }
    Ok(())
}

/// A page of a listing: its items and the cursor of the next page.
trait Paged {
    /// What the listing lists.
    type Item;
    /// The items and the cursor.
    fn into_parts(self) -> (Vec<Self::Item>, Option<String>);
    /// A page of these items.
    fn from_parts(items: Vec<Self::Item>, next: Option<String>) -> Self;
}

impl Paged for DeadLetterPage {
    type Item = crate::admin::model::DeadLetter;

    fn into_parts(self) -> (Vec<Self::Item>, Option<String>) {
        (self.dead_letters, self.next)
    }

    fn from_parts(dead_letters: Vec<Self::Item>, next: Option<String>) -> Self {
        DeadLetterPage { dead_letters, next }
    }
}

impl Paged for QuarantinePage {
    type Item = crate::admin::model::QuarantinedBody;

    fn into_parts(self) -> (Vec<Self::Item>, Option<String>) {
        (self.quarantine, self.next)
    }

    fn from_parts(quarantine: Vec<Self::Item>, next: Option<String>) -> Self {
        QuarantinePage { quarantine, next }
    }
}

/// One page of a listing, or with `all` every page from there on, joined
/// into one page (`next` null). `after` is the query's cursor.
async fn pages<Q, P, Fut>(
    mut query: Q,
    all: bool,
    after: fn(&mut Q) -> &mut Option<String>,
    fetch: impl Fn(Q) -> Fut,
) -> Result<P, OpsError>
where
    Q: Clone,
    P: Paged,
    Fut: Future<Output = Result<P, OpsError>>,
{
    let mut joined = Vec::new();
    loop {
        let page = fetch(query.clone()).await?;
        if !all {
            return Ok(page);
        }
        let (items, next) = page.into_parts();
        joined.extend(items);
        match next {
            Some(next) => *after(&mut query) = Some(next),
            None => return Ok(P::from_parts(joined, None)),
        }
    }
}

impl PageArgs {
    /// The API's window and page parameters.
    fn query(&self, range: &TimeRange) -> PageQuery {
        PageQuery {
            since: range.since.clone(),
            until: range.until.clone(),
            limit: self.limit,
            after: self.after.clone(),
        }
    }
}

/// A time option as the API takes it.
fn time_arg(text: &Option<String>) -> Option<TimeArg> {
    text.clone().map(TimeArg::Text)
}

impl DlqSelectArgs {
    /// The API's selection: `all`, the listed ids, or the filter's fields
    /// that were given (clap lets only one of them through).
    fn selection(&self) -> Result<DeadLetterSelection, OpsError> {
        let ids = self
            .ids
            .iter()
            .map(|&id| {
                i64::try_from(id)
                    .map_err(|_| OpsError::Usage(format!("{id} is not a dead letter id")))
            })
            .collect::<Result<Vec<i64>, OpsError>>()?;
        Ok(DeadLetterSelection {
            ids,
            target: self.filter.target.clone(),
            reason: self.filter.reason.clone(),
            since: time_arg(&self.filter.range.since),
            until: time_arg(&self.filter.range.until),
            all: self.all,
        })
    }
}

impl QuarantineSelectArgs {
    /// The API's selection: `all`, the listed hashes, or the time window.
    fn selection(&self) -> QuarantineSelection {
        QuarantineSelection {
            hashes: self.hashes.clone(),
            since: time_arg(&self.range.since),
            until: time_arg(&self.range.until),
            all: self.all,
        }
    }
}

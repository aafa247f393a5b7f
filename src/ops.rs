//! The operator's commands on a running relay: `targets`, `pause`, `resume`,
//! `dlq list|show|replay|purge` and `quarantine list|show|replay|purge`. Each
//! is one call (or, for `--all-pages`, a few) to the relay's admin API
//! (docs/admin-api.md), printed as an aligned table or as the API's own JSON.
//! Nothing here opens the store: the relay answers, so the command line sees
//! what the API sees, on either backend and beside any number of instances.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Map, Value};

use crate::config::{AdminConfig, Config};
use crate::delivery::sink::HttpClient;

/// How long one API call may take: a replay of many dead letters is long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Characters of an error message kept in a table cell (the rest is `…`).
const ERROR_WIDTH: usize = 60;

/// Bytes of a path segment sent as they are; the rest is percent-encoded, so a
/// target name or hash cannot change the path it is put in.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

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
        OpsCommand::Targets(api) => get_and_print(&api, "targets", targets_table).await,
        OpsCommand::Pause(args) => set_paused(&args, "pause").await,
        OpsCommand::Resume(args) => set_paused(&args, "resume").await,
        OpsCommand::Dlq { action } => dead_letters(action).await,
        OpsCommand::Quarantine { action } => quarantine(action).await,
    }
}

async fn set_paused(args: &TargetArgs, verb: &str) -> Result<(), OpsError> {
    let path = format!("targets/{}/{verb}", segment(&args.target));
    post_and_print(&args.api, &path, json!({}), pause_line).await
}

async fn dead_letters(action: DlqAction) -> Result<(), OpsError> {
    match action {
        DlqAction::List(args) => {
            let filter = args.filter.pairs();
            let api = Api::locate(&args.api)?;
            let answer = list(&api, "dead-letters", "dead_letters", &filter, &args.page).await?;
            print_answer(&args.api, &answer, dead_letters_table);
            Ok(())
        }
        DlqAction::Show(args) => {
            let path = format!("dead-letters/{}", args.id);
            get_and_print(&args.api, &path, dead_letter_record).await
        }
        DlqAction::Replay(args) => {
            let chosen = args.selection();
            post_and_print(&args.api, "dead-letters/replay", chosen, replayed_line).await
        }
        DlqAction::Purge(args) => {
            let chosen = args.selection();
            post_and_print(&args.api, "dead-letters/purge", chosen, purged_line).await
        }
    }
}

async fn quarantine(action: QuarantineAction) -> Result<(), OpsError> {
    match action {
        QuarantineAction::List(args) => {
            let filter = args.range.pairs();
            let api = Api::locate(&args.api)?;
            let answer = list(&api, "quarantine", "quarantine", &filter, &args.page).await?;
            print_answer(&args.api, &answer, quarantine_table);
            Ok(())
        }
        QuarantineAction::Show(args) => {
            let path = format!("quarantine/{}", segment(&args.hash));
            get_and_print(&args.api, &path, quarantined_record).await
        }
        QuarantineAction::Replay(args) => {
            let chosen = args.selection();
            post_and_print(&args.api, "quarantine/replay", chosen, quarantine_replayed).await
        }
        QuarantineAction::Purge(args) => {
            let chosen = args.selection();
            post_and_print(&args.api, "quarantine/purge", chosen, purged_line).await
        }
    }
}

/// GETs `path` and prints the answer.
async fn get_and_print(
    options: &ApiOptions,
    path: &str,
    render: fn(&Value) -> String,
) -> Result<(), OpsError> {
    let answer = Api::locate(options)?.get(path).await?;
    print_answer(options, &answer, render);
    Ok(())
}

/// POSTs `body` to `path` and prints the answer.
async fn post_and_print(
    options: &ApiOptions,
    path: &str,
    body: Value,
    render: fn(&Value) -> String,
) -> Result<(), OpsError> {
    let answer = Api::locate(options)?.post(path, &body).await?;
    print_answer(options, &answer, render);
    Ok(())
}

impl TimeRange {
    /// The window as query or body fields.
    fn pairs(&self) -> Vec<(&'static str, Option<&str>)> {
        vec![
            ("since", self.since.as_deref()),
            ("until", self.until.as_deref()),
        ]
    }
}

impl DeadLetterFilterArgs {
    /// The filter as query or body fields.
    fn pairs(&self) -> Vec<(&'static str, Option<&str>)> {
        let mut pairs = vec![
            ("target", self.target.as_deref()),
            ("reason", self.reason.as_deref()),
        ];
        pairs.extend(self.range.pairs());
        pairs
    }
}

impl DlqSelectArgs {
    /// The API's selection body.
    fn selection(&self) -> Value {
        selection(self.all, "ids", &self.ids, &self.filter.pairs())
    }
}

impl QuarantineSelectArgs {
    /// The API's selection body.
    fn selection(&self) -> Value {
        selection(self.all, "hashes", &self.hashes, &self.range.pairs())
    }
}

/// A replay or purge body (docs/admin-api.md): `{"all": true}`, the listed
/// ids or hashes under `key`, or the filter's fields that were given.
fn selection<T: serde::Serialize>(
    all: bool,
    key: &str,
    listed: &[T],
    filter: &[(&str, Option<&str>)],
) -> Value {
    if all {
        return json!({ "all": true });
    }
    if !listed.is_empty() {
        return json!({ key: listed });
    }
    let fields: Map<String, Value> = filter
        .iter()
        .filter_map(|(name, value)| Some(((*name).to_owned(), json!((*value)?))))
        .collect();
    Value::Object(fields)
}

/// Lists one page from `path`, or with `--all-pages` every page from there
/// on, joined into one answer of the API's shape (items under `items`,
/// `next` null).
async fn list(
    api: &Api,
    path: &str,
    items: &str,
    filter: &[(&str, Option<&str>)],
    page: &PageArgs,
) -> Result<Value, OpsError> {
    let limit = page.limit.map(|n| n.to_string());
    let mut after = page.after.clone();
    let mut joined = Vec::new();
    loop {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, value) in filter
            .iter()
            .chain(&[("limit", limit.as_deref()), ("after", after.as_deref())])
        {
            if let Some(value) = value {
                query.append_pair(key, value);
            }
        }
        let mut answer = api.get(&format!("{path}?{}", query.finish())).await?;
        after = answer["next"].as_str().map(str::to_owned);
        if !page.all_pages {
            return Ok(answer);
        }
        if let Some(Value::Array(found)) = answer.get_mut(items).map(Value::take) {
            joined.extend(found);
        }
        if after.is_none() {
            return Ok(json!({ items: joined, "next": null }));
        }
    }
}

/// The path segment `text`, percent-encoded.
fn segment(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

/// A running relay's admin API: where it is and the token it wants.
struct Api {
    /// `http://host:port` (or the given URL), without a trailing slash.
    base: String,
    /// The bearer token; None sends none (the relay then says why it refuses).
    token: Option<String>,
    client: HttpClient,
}

impl Api {
    /// Finds the relay from the options: `--admin` and `--token-file` win
    /// over the config file, which is not read when both are given.
    fn locate(options: &ApiOptions) -> Result<Api, OpsError> {
        let (base, token) = match (&options.admin, &options.token_file) {
            (Some(url), Some(file)) => (admin_url(url)?, token_in(file)?),
            (url, file) => {
                let config = Config::load(&options.config)
                    .map_err(|err| OpsError::Usage(err.to_string()))?;
                let base = match url {
                    Some(url) => admin_url(url)?,
                    None => listener_url(config.admin_listen),
                };
                let token = match file {
                    Some(file) => token_in(file)?,
                    None => config.admin.token().map_err(|err| {
                        OpsError::Usage(format!(
                            "{}: admin.token_file: {err}",
                            options.config.display()
                        ))
                    })?,
                };
                (base, token)
            }
        };
        let client = crate::delivery::build_client()
            .map_err(|err| OpsError::Relay(format!("cannot set up an HTTP client: {err}")))?;
        Ok(Api {
            base,
            token,
            client,
        })
    }

    async fn get(&self, path: &str) -> Result<Value, OpsError> {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, OpsError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// One request to `/api/v1/{path}`, bounded by [`REQUEST_TIMEOUT`]; the
    /// answer's JSON, or the API's `error` with the status.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, OpsError> {
        let url = format!("{}/api/v1/{path}", self.base);
        let mut request = Request::builder()
            .method(method)
            .uri(&url)
            .header(ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = request
            .body(Full::new(body))
            .map_err(|err| OpsError::Usage(format!("cannot make a request to {url}: {err}")))?;
        let (status, answer) = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(request))
            .await
            .map_err(|_| {
                OpsError::Relay(format!(
                    "the relay's admin API at {} did not answer within {} s",
                    self.base,
                    REQUEST_TIMEOUT.as_secs()
                ))
            })??;
        interpret(status, &answer)
    }

    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), OpsError> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| self.unreachable(&err))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| self.unreachable(&err))?;
        Ok((status, body.to_bytes()))
    }

    fn unreachable(&self, err: &(dyn std::error::Error + 'static)) -> OpsError {
        OpsError::Relay(format!(
            "cannot reach the relay's admin API at {}: {}",
            self.base,
            error_chain(err)
        ))
    }
}

/// The error and its causes, `: `-separated (the client's own message alone
/// says no more than "client error (Connect)").
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The answer's JSON on success; otherwise `<status>: <the API's error>`.
fn interpret(status: StatusCode, answer: &[u8]) -> Result<Value, OpsError> {
    let parsed = serde_json::from_slice::<Value>(answer);
    if status.is_success() {
        return parsed.map_err(|err| {
            OpsError::Relay(format!("{status}, but the answer is not JSON: {err}"))
        });
    }
    let message = match &parsed {
        Ok(json) => json["error"].as_str().map(str::to_owned),
        Err(_) => None,
    }
    .unwrap_or_else(|| String::from_utf8_lossy(answer).trim().to_owned());
    Err(OpsError::Relay(format!("{status}: {message}")))
}

/// `--admin`: an http:// or https:// URL, kept without its trailing slash
/// (a path prefix, say behind a proxy, is kept).
fn admin_url(url: &str) -> Result<String, OpsError> {
    let parsed: hyper::Uri = url
        .parse()
        .map_err(|err| OpsError::Usage(format!("--admin {url:?}: not a URL: {err}")))?;
    let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
    if !scheme_ok || parsed.authority().is_none() || parsed.query().is_some() {
        return Err(OpsError::Usage(format!(
            "--admin {url:?}: give the admin listener as http://HOST:PORT or https://HOST:PORT"
        )));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// The URL of an admin listener address; one on every address is asked
/// over loopback.
fn listener_url(mut address: std::net::SocketAddr) -> String {
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{address}")
}

/// `--token-file`: read and checked like the relay's `admin.token_file`.
fn token_in(file: &Path) -> Result<Option<String>, OpsError> {
    AdminConfig {
        token_file: Some(file.to_owned()),
    }
    .token()
    .map_err(|err| OpsError::Usage(format!("--token-file: {err}")))
}

/// Prints the answer as JSON (`--json`) or through `render`.
fn print_answer(options: &ApiOptions, answer: &Value, render: fn(&Value) -> String) {
    if options.json {
        println!("{answer:#}");
    } else {
        print!("{}", render(answer));
    }
}

/// A table column: its header and which side its cells keep to.
struct Column {
    header: &'static str,
    right: bool,
}

/// A column of text, aligned left.
const fn text(header: &'static str) -> Column {
    Column {
        header,
        right: false,
    }
}

/// A column of numbers, aligned right.
const fn number(header: &'static str) -> Column {
    Column {
        header,
        right: true,
    }
}

/// Rows under their headers, each column as wide as its widest cell, two
/// spaces apart.
fn table(columns: &[Column], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .fold(column.header.len(), usize::max)
        })
        .collect();
    let headers: Vec<String> = columns.iter().map(|c| c.header.to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&headers).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(columns.iter().zip(&widths))
            .map(|(cell, (column, &width))| {
                if column.right {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The items of a list answer (none when the key is missing).
fn items<'a>(answer: &'a Value, key: &str) -> &'a [Value] {
    answer[key]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A value as a one-line cell: `-` for null, `yes`/`no` for booleans.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::String(text) => text.replace(char::is_control, " "),
        other => other.to_string(),
    }
}

/// A cell cut to `width` characters.
fn clipped(value: &Value, width: usize) -> String {
    let full = cell(value);
    if full.chars().count() <= width {
        return full;
    }
    let kept: String = full.chars().take(width - 1).collect();
    format!("{kept}…")
}

/// An API time (RFC 3339 with milliseconds) to the second.
fn moment(value: &Value) -> String {
    value
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
        .unwrap_or_else(|| cell(value))
}

/// An age in seconds as people read it: `4.2s`, `3m10s`, `2h`, `1d3h`.
fn age(value: &Value) -> String {
    let Some(seconds) = value.as_f64() else {
        return cell(value);
    };
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let whole = seconds as u64;
    let (count, unit, rest, rest_unit) = match whole {
        ..3600 => (whole / 60, "m", whole % 60, "s"),
        3600..86400 => (whole / 3600, "h", whole % 3600 / 60, "m"),
        _ => (whole / 86400, "d", whole % 86400 / 3600, "h"),
    };
    match rest {
        0 => format!("{count}{unit}"),
        _ => format!("{count}{unit}{rest}{rest_unit}"),
    }
}

/// The count line under a list, and the cursor of the next page if any.
fn list_footer(answer: &Value, count: usize, one: &str, many: &str) -> String {
    let mut footer = format!("{count} {}\n", if count == 1 { one } else { many });
    if let Some(next) = answer["next"].as_str() {
        footer.push_str(&format!("more: --after {next}\n"));
    }
    footer
}

fn targets_table(answer: &Value) -> String {
    const COLUMNS: &[Column] = &[
        text("NAME"),
        text("PAUSED"),
        number("PENDING"),
        number("DUE"),
        number("DEAD"),
        number("OLDEST"),
        text("LAST ERROR"),
    ];
    let rows: Vec<Vec<String>> = items(answer, "targets")
        .iter()
        .map(|t| {
            let name = match t["configured"].as_bool() {
                Some(false) => format!("{} (not configured)", cell(&t["name"])),
                _ => cell(&t["name"]),
            };
            vec![
                name,
                cell(&t["paused"]),
                cell(&t["pending"]),
                cell(&t["due"]),
                cell(&t["dead"]),
                age(&t["oldest_pending_age_seconds"]),
                clipped(&t["last_error"], ERROR_WIDTH),
            ]
        })
        .collect();
    table(COLUMNS, &rows)
}

fn pause_line(answer: &Value) -> String {
    let state = match answer["paused"].as_bool() {
        Some(true) => "paused (it keeps queueing; `resume` to deliver again)",
        _ => "delivering",
    };
    format!("{}: {state}\n", cell(&answer["target"]))
}

fn dead_letters_table(answer: &Value) -> String {
    const COLUMNS: &[Column] = &[
        number("ID"),
        text("TARGET"),
        text("REASON"),
        number("ATTEMPTS"),
        number("STATUS"),
        text("DEAD AT"),
        text("LAST ERROR"),
    ];
    let letters = items(answer, "dead_letters");
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                cell(&l["id"]),
                cell(&l["target"]),
                cell(&l["reason"]),
                cell(&l["attempts"]),
                cell(&l["last_status"]),
                moment(&l["dead_at"]),
                clipped(&l["last_error"], ERROR_WIDTH),
            ]
        })
        .collect();
    table(COLUMNS, &rows) + &list_footer(answer, letters.len(), "dead letter", "dead letters")
}

fn dead_letter_record(answer: &Value) -> String {
    record(
        answer,
        &[
            "id",
            "event_id",
            "target",
            "reason",
            "attempts",
            "last_status",
            "last_error",
            "dead_at",
            "received_at",
            "content_type",
        ],
        &["envelope", "raw_body", "raw_body_base64"],
    )
}

fn quarantined_record(answer: &Value) -> String {
    record(
        answer,
        &[
            "body_hash",
            "content_type",
            "size",
            "truncated",
            "seen_count",
            "first_seen",
            "last_seen",
            "error",
        ],
        &["body", "body_base64"],
    )
}

/// One object as aligned `key: value` lines, the `first` keys in that order
/// and then any other one-line field; then each long field (`blocks`, and any
/// object or array) under its name.
fn record(answer: &Value, first: &[&str], blocks: &[&str]) -> String {
    let Some(object) = answer.as_object() else {
        return format!("{answer:#}\n");
    };
    let mut keys: Vec<&str> = first
        .iter()
        .copied()
        .filter(|key| object.contains_key(*key))
        .collect();
    keys.extend(
        object
            .keys()
            .map(String::as_str)
            .filter(|key| !first.contains(key)),
    );
    let (long, short): (Vec<&str>, Vec<&str>) = keys.into_iter().partition(|key| {
        blocks.contains(key) || object[*key].is_object() || object[*key].is_array()
    });
    let width = short.iter().map(|key| key.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for key in short {
        let label = format!("{key}:");
        out.push_str(&format!("{label:<width$} {}\n", cell(&object[key])));
    }
    for key in long {
        match &object[key] {
            Value::String(text) => out.push_str(&format!("{key}:\n{text}\n")),
            other => out.push_str(&format!("{key}:\n{other:#}\n")),
        }
    }
    out
}

fn replayed_line(answer: &Value) -> String {
    let mut out = format!(
        "replayed {}, skipped {}\n",
        cell(&answer["replayed"]),
        cell(&answer["skipped"])
    );
    for example in items(answer, "skipped_examples") {
        out.push_str(&format!(
            "  skipped {}: {}\n",
            cell(&example["id"]),
            cell(&example["reason"])
        ));
    }
    out.push_str(&not_found_line(answer));
    out
}

fn purged_line(answer: &Value) -> String {
    format!(
        "purged {}\n{}",
        cell(&answer["purged"]),
        not_found_line(answer)
    )
}

/// Ids or hashes that were asked for but are not there (a typo?).
fn not_found_line(answer: &Value) -> String {
    let missing = items(answer, "not_found");
    if missing.is_empty() {
        return String::new();
    }
    let missing: Vec<String> = missing.iter().map(cell).collect();
    format!("not found: {}\n", missing.join(" "))
}

fn quarantine_table(answer: &Value) -> String {
    const COLUMNS: &[Column] = &[
        text("HASH"),
        text("FIRST SEEN"),
        text("LAST SEEN"),
        number("SEEN"),
        number("SIZE"),
        text("KEPT"),
        text("CONTENT TYPE"),
        text("ERROR"),
    ];
    let bodies = items(answer, "quarantine");
    let rows: Vec<Vec<String>> = bodies
        .iter()
        .map(|b| {
            vec![
                cell(&b["body_hash"]),
                moment(&b["first_seen"]),
                moment(&b["last_seen"]),
                cell(&b["seen_count"]),
                cell(&b["size"]),
                // Beyond `quarantine.max_bytes` only a prefix is kept.
                if b["truncated"] == Value::Bool(true) {
                    "prefix".to_owned()
                } else {
                    "whole".to_owned()
                },
                cell(&b["content_type"]),
                clipped(&b["error"], ERROR_WIDTH),
            ]
        })
        .collect();
    table(COLUMNS, &rows)
        + &list_footer(
            answer,
            bodies.len(),
            "quarantined body",
            "quarantined bodies",
        )
}

fn quarantine_replayed(answer: &Value) -> String {
    const COLUMNS: &[Column] = &[text("HASH"), text("OUTCOME"), text("DETAIL")];
    let rows: Vec<Vec<String>> = items(answer, "results")
        .iter()
        .map(|r| vec![cell(&r["body_hash"]), cell(&r["outcome"]), replay_detail(r)])
        .collect();
    let summary = format!(
        "accepted {}, duplicate {}, still invalid {}, truncated {}\n{}",
        cell(&answer["accepted"]),
        cell(&answer["duplicate"]),
        cell(&answer["still_invalid"]),
        cell(&answer["truncated"]),
        not_found_line(answer)
    );
    if rows.is_empty() {
        summary
    } else {
        summary + &table(COLUMNS, &rows)
    }
}

/// What became of one replayed body: its new id and targets, the postback
/// it duplicates, or why it still does not parse.
fn replay_detail(result: &Value) -> String {
    match result["outcome"].as_str() {
        Some("accepted") => {
            let targets: Vec<String> = items(result, "targets").iter().map(cell).collect();
            format!("id {} → {}", cell(&result["id"]), targets.join(", "))
        }
        Some("duplicate") => format!("of {}", cell(&result["original_id"])),
        _ => clipped(&result["error"], ERROR_WIDTH),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_people_say_them() {
        for (seconds, said) in [
            (4.23, "4.2s"),
            (190.0, "3m10s"),
            (7200.0, "2h"),
            (7260.0, "2h1m"),
            (97200.0, "1d3h"),
        ] {
            assert_eq!(age(&json!(seconds)), said);
        }
        assert_eq!(age(&Value::Null), "-");
    }

    #[test]
    fn tables_align_their_columns() {
        let rows = vec![
            vec!["a".to_owned(), "7".to_owned(), "x".to_owned()],
            vec!["long name".to_owned(), "12".to_owned(), "-".to_owned()],
        ];
        let rendered = table(&[text("NAME"), number("N"), text("LAST")], &rows);
        assert_eq!(
            rendered,
            "NAME        N  LAST\na           7  x\nlong name  12  -\n"
        );
    }

    #[test]
    fn errors_carry_the_status_and_the_apis_message() {
        let err = interpret(StatusCode::UNAUTHORIZED, br#"{"error": "no"}"#).unwrap_err();
        assert_eq!(err.to_string(), "401 Unauthorized: no");
        let err = interpret(StatusCode::BAD_GATEWAY, b"proxy down").unwrap_err();
        assert_eq!(err.to_string(), "502 Bad Gateway: proxy down");
    }
}

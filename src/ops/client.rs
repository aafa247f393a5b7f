//! The CLI's client of a running relay's admin API: typed calls that return
//! the API's own [`model`] types, with one place for where the relay is,
//! its token, timeouts and how a failure reads (and so the exit code).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{ApiOptions, OpsError};
use crate::admin::model::{
    DeadLetterDetail, DeadLetterPage, DeadLetterQuery, DeadLetterReplay, DeadLetterSelection,
    ErrorBody, PageQuery, PauseState, Purged, QuarantinePage, QuarantineReplay,
    QuarantineSelection, QuarantinedDetail, Targets,
};
use crate::config::{AdminConfig, Config};
use crate::delivery::sink::HttpClient;

/// How long one API call may take: a replay of many dead letters is long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of a path segment sent as they are; the rest is percent-encoded, so a
/// target name or hash cannot change the path it is put in.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A running relay's admin API: where it is and the token it wants.
pub struct Client {
    /// `http://host:port` (or the given URL), without a trailing slash.
    base: String,
    /// The bearer token; None sends none (the relay then says why it refuses).
    token: Option<String>,
    http: HttpClient,
}

impl Client {
    /// Finds the relay from the options: `--admin` and `--token-file` win
    /// over the config file, which is not read when both are given.
    pub fn locate(options: &ApiOptions) -> Result<Client, OpsError> {
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
        let http = crate::delivery::build_client()
            .map_err(|err| OpsError::Relay(format!("cannot set up an HTTP client: {err}")))?;
        Ok(Client { base, token, http })
    }

    /// `GET /api/v1/targets`.
    pub async fn targets(&self) -> Result<Targets, OpsError> {
        self.call(Method::GET, "targets", None::<&()>).await
    }

    /// `POST /api/v1/targets/{target}/pause` (or `/resume`).
    pub async fn set_paused(&self, target: &str, paused: bool) -> Result<PauseState, OpsError> {
        let verb = if paused { "pause" } else { "resume" };
        let path = format!("targets/{}/{verb}", segment(target));
        self.call(Method::POST, &path, Some(&serde_json::json!({})))
            .await
    }

    /// `GET /api/v1/dead-letters`: one page.
    pub async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<DeadLetterPage, OpsError> {
        self.call(Method::GET, &listing("dead-letters", query)?, None::<&()>)
            .await
    }

    /// `GET /api/v1/dead-letters/{id}`.
    pub async fn dead_letter(&self, id: u64) -> Result<DeadLetterDetail, OpsError> {
        self.call(Method::GET, &format!("dead-letters/{id}"), None::<&()>)
            .await
    }

    /// `POST /api/v1/dead-letters/replay`.
    pub async fn replay_dead_letters(
        &self,
        selection: &DeadLetterSelection,
    ) -> Result<DeadLetterReplay, OpsError> {
        self.call(Method::POST, "dead-letters/replay", Some(selection))
            .await
    }

    /// `POST /api/v1/dead-letters/purge`.
    pub async fn purge_dead_letters(
        &self,
        selection: &DeadLetterSelection,
    ) -> Result<Purged<i64>, OpsError> {
        self.call(Method::POST, "dead-letters/purge", Some(selection))
            .await
    }

    /// `GET /api/v1/quarantine`: one page.
    pub async fn quarantine(&self, query: &PageQuery) -> Result<QuarantinePage, OpsError> {
        self.call(Method::GET, &listing("quarantine", query)?, None::<&()>)
            .await
    }

    /// `GET /api/v1/quarantine/{hash}`.
    pub async fn quarantined(&self, hash: &str) -> Result<QuarantinedDetail, OpsError> {
        let path = format!("quarantine/{}", segment(hash));
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// `POST /api/v1/quarantine/replay`.
    pub async fn replay_quarantine(
        &self,
        selection: &QuarantineSelection,
    ) -> Result<QuarantineReplay, OpsError> {
        self.call(Method::POST, "quarantine/replay", Some(selection))
            .await
    }

    /// `POST /api/v1/quarantine/purge`.
    pub async fn purge_quarantine(
        &self,
        selection: &QuarantineSelection,
    ) -> Result<Purged<String>, OpsError> {
        self.call(Method::POST, "quarantine/purge", Some(selection))
            .await
    }

    /// One request to `/api/v1/{path}`, bounded by [`REQUEST_TIMEOUT`]; the
    /// answer, or the API's `error` with the status.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, OpsError> {
        let url = format!("{}/api/v1/{path}", self.base);
        let mut request = Request::builder()
            .method(method)
            .uri(&url)
            .header(ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(body).map_err(|err| {
                    OpsError::Usage(format!("cannot write the request to {url}: {err}"))
                })?)
            }
            None => Bytes::new(),
        };
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
            .http
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

/// `path?query`: the query's parameters that are set.
fn listing<Q: Serialize>(path: &str, query: &Q) -> Result<String, OpsError> {
    let fields = serde_json::to_value(query)
        .map_err(|err| OpsError::Usage(format!("cannot write the query of {path}: {err}")))?;
    let mut encoded = form_urlencoded::Serializer::new(String::new());
    for (key, value) in fields.as_object().into_iter().flatten() {
        match value {
            serde_json::Value::String(text) => encoded.append_pair(key, text),
            other => encoded.append_pair(key, &other.to_string()),
        };
    }
    Ok(format!("{path}?{}", encoded.finish()))
}

/// The path segment `text`, percent-encoded.
fn segment(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
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

/// The answer on success; otherwise `<status>: <the API's error>`.
fn interpret<T: DeserializeOwned>(status: StatusCode, answer: &[u8]) -> Result<T, OpsError> {
    if status.is_success() {
        return serde_json::from_slice(answer).map_err(|err| {
            OpsError::Relay(format!(
                "{status}, but the answer is not what the API sends: {err}"
            ))
        });
    }
    let message = serde_json::from_slice::<ErrorBody>(answer)
        .map(|body| body.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(answer).trim().to_owned());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_status_and_the_apis_message() {
        let err =
            interpret::<Targets>(StatusCode::UNAUTHORIZED, br#"{"error": "no"}"#).unwrap_err();
        assert_eq!(err.to_string(), "401 Unauthorized: no");
        let err = interpret::<Targets>(StatusCode::BAD_GATEWAY, b"proxy down").unwrap_err();
        assert_eq!(err.to_string(), "502 Bad Gateway: proxy down");
    }

    #[test]
    fn a_listing_sends_only_the_parameters_given() {
        let query = DeadLetterQuery {
            target: Some("(no route)".into()),
            page: PageQuery {
                limit: Some(2),
                ..PageQuery::default()
            },
            ..DeadLetterQuery::default()
        };
        assert_eq!(
            listing("dead-letters", &query).unwrap(),
            "dead-letters?limit=2&target=%28no+route%29"
        );
        assert_eq!(
            listing("quarantine", &PageQuery::default()).unwrap(),
            "quarantine?"
        );
    }
}

//! Dead letters and quarantined bodies are listed, chosen and walked the
//! same way (a page with a `next` cursor; a replay or purge takes listed
//! ids/hashes, a filter or `all`, a chunk at a time): one implementation
//! of each, generic over the [`Kind`], which says what differs.

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::model::{self, DeadLetterSelection, Purged, QuarantineSelection};
use super::refusal::{bad_request, millis, parse_time, time, Refusal};
use super::Admin;
use crate::store::{
    DeadLetter, DeadLetterFilter, DeadLetterId, OperatorStore, Page, QuarantineFilter,
    QuarantinedBody, StoreError,
};

/// Items per page when the client does not say, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Items a replay or purge reads and writes per store call.
const CHUNK: usize = 500;

const SAY_WHICH: &str = "say which: a list of ids/hashes, a filter, or {\"all\": true}";

/// What differs between dead letters and quarantined bodies.
#[async_trait]
pub(super) trait Kind: Send + Sync + 'static {
    /// How an operator names one item: a dead letter id, a body hash.
    type Key: Clone + Send + Sync + Serialize;
    /// An item as the store keeps it.
    type Item: Send + Sync;
    /// Which items a filter means.
    type Filter: Default + PartialEq + Send + Sync;
    /// Where a page of the store's listing starts (the last item before it).
    type Cursor: Clone + PartialOrd + Send + Sync;
    /// The body of a replay or purge.
    type Selection: DeserializeOwned;
    /// A listing's answer.
    type Page: Serialize;

    /// The selection's name in errors.
    const SELECTION: &'static str;
    /// The listing's query parameters.
    const PARAMETERS: &'static [&'static str];
    /// The items' name in log lines.
    const PLURAL: &'static str;

    /// A selection's parts.
    fn split(selection: Self::Selection) -> Result<Parts<Self::Key, Self::Filter>, Refusal>;
    /// A listing's filter.
    fn filter(listing: &Listing) -> Self::Filter;
    /// The item's key.
    fn key(item: &Self::Item) -> Self::Key;
    /// The item as a page cursor.
    fn cursor(item: &Self::Item) -> Self::Cursor;
    /// The item as the `next` of a page.
    fn cursor_text(item: &Self::Item) -> String;
    /// An `after` parameter (None: not one of ours).
    fn parse_cursor(text: &str) -> Option<Self::Cursor>;
    /// A listing's answer.
    fn page(items: &[Self::Item], next: Option<String>) -> Self::Page;
    /// One item (None: there is no such item).
    async fn one(
        store: &dyn OperatorStore,
        key: &Self::Key,
    ) -> Result<Option<Self::Item>, StoreError>;
    /// One page of the store's listing.
    async fn list(
        store: &dyn OperatorStore,
        filter: &Self::Filter,
        page: &Page<Self::Cursor>,
    ) -> Result<Vec<Self::Item>, StoreError>;
    /// Where a filter's walk ends, read as it begins.
    async fn walk_end(store: &dyn OperatorStore) -> Result<End<Self::Cursor>, StoreError>;
    /// Deletes items; how many were there.
    async fn purge(store: &dyn OperatorStore, keys: &[Self::Key]) -> Result<u64, StoreError>;
}

/// A selection's parts: listed keys, a filter, `all` (one of them is set
/// in a good selection).
pub(super) struct Parts<K, F> {
    keys: Vec<K>,
    filter: F,
    all: bool,
}

/// Where a filter's walk ends.
#[derive(Clone)]
pub(super) enum End<C> {
    /// Nowhere: it takes what it meets.
    Open,
    /// There was nothing to walk.
    Empty,
    /// At this item, inclusive.
    At(C),
}

/// Dead letters. A filter's walk ends at the newest dead letter when it
/// began (ids grow), so letters that a replay sends straight back to the
/// dead letters are not taken again.
pub(super) struct DeadLetters;

#[async_trait]
impl Kind for DeadLetters {
    type Key = DeadLetterId;
    type Item = DeadLetter;
    type Filter = DeadLetterFilter;
    type Cursor = DeadLetterId;
    type Selection = DeadLetterSelection;
    type Page = model::DeadLetterPage;

    const SELECTION: &'static str = "dead letter selection";
    const PARAMETERS: &'static [&'static str] =
        &["target", "reason", "since", "until", "limit", "after"];
    const PLURAL: &'static str = "dead letters";

    fn split(s: DeadLetterSelection) -> Result<Parts<DeadLetterId, DeadLetterFilter>, Refusal> {
        let filter = DeadLetterFilter {
            target: s.target,
            reason: s.reason,
            since_ms: millis("since", s.since.as_ref())?,
            until_ms: millis("until", s.until.as_ref())?,
        };
        Ok(Parts {
            keys: s.ids,
            filter,
            all: s.all,
        })
    }

    fn filter(listing: &Listing) -> DeadLetterFilter {
        DeadLetterFilter {
            target: listing.target.clone(),
            reason: listing.reason.clone(),
            since_ms: listing.since_ms,
            until_ms: listing.until_ms,
        }
    }

    fn key(letter: &DeadLetter) -> DeadLetterId {
        letter.id
    }

    fn cursor(letter: &DeadLetter) -> DeadLetterId {
        letter.id
    }

    fn cursor_text(letter: &DeadLetter) -> String {
        letter.id.to_string()
    }

    fn parse_cursor(text: &str) -> Option<DeadLetterId> {
        text.parse().ok()
    }

    fn page(letters: &[DeadLetter], next: Option<String>) -> model::DeadLetterPage {
        model::DeadLetterPage {
            dead_letters: letters.iter().map(dead_letter).collect(),
            next,
        }
    }

    async fn one(
        store: &dyn OperatorStore,
        id: &DeadLetterId,
    ) -> Result<Option<DeadLetter>, StoreError> {
        Ok(store.dead_letter(*id).await?.map(|detail| detail.letter))
    }

    async fn list(
        store: &dyn OperatorStore,
        filter: &DeadLetterFilter,
        page: &Page<DeadLetterId>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        store.list_dead_letters(filter, page).await
    }

    async fn walk_end(store: &dyn OperatorStore) -> Result<End<DeadLetterId>, StoreError> {
        Ok(match store.newest_dead_letter_id().await? {
            Some(newest) => End::At(newest),
            None => End::Empty,
        })
    }

    async fn purge(store: &dyn OperatorStore, ids: &[DeadLetterId]) -> Result<u64, StoreError> {
        store.purge_dead_letters(ids).await
    }
}

/// A dead letter as the API lists it.
pub(super) fn dead_letter(letter: &DeadLetter) -> model::DeadLetter {
    model::DeadLetter {
        id: letter.id,
        event_id: letter.event_id.clone(),
        target: letter.target.clone(),
        reason: letter.reason.clone(),
        attempts: letter.attempts,
        last_status: letter.last_status,
        last_error: letter.last_error.clone(),
        dead_at: time(letter.dead_at_ms),
        received_at: time(letter.received_at_ms),
    }
}

/// Quarantined bodies, by first arrival and then hash.
pub(super) struct Quarantine;

#[async_trait]
impl Kind for Quarantine {
    type Key = String;
    type Item = QuarantinedBody;
    type Filter = QuarantineFilter;
    type Cursor = (i64, String);
    type Selection = QuarantineSelection;
    type Page = model::QuarantinePage;

    const SELECTION: &'static str = "quarantine selection";
    const PARAMETERS: &'static [&'static str] = &["since", "until", "limit", "after"];
    const PLURAL: &'static str = "quarantined bodies";

    fn split(s: QuarantineSelection) -> Result<Parts<String, QuarantineFilter>, Refusal> {
        let filter = QuarantineFilter {
            since_ms: millis("since", s.since.as_ref())?,
            until_ms: millis("until", s.until.as_ref())?,
        };
        Ok(Parts {
            keys: s.hashes,
            filter,
            all: s.all,
        })
    }

    fn filter(listing: &Listing) -> QuarantineFilter {
        QuarantineFilter {
            since_ms: listing.since_ms,
            until_ms: listing.until_ms,
        }
    }

    fn key(body: &QuarantinedBody) -> String {
        body.body_hash.clone()
    }

    fn cursor(body: &QuarantinedBody) -> (i64, String) {
        (body.first_seen_ms, body.body_hash.clone())
    }

    /// `<first_seen ms>.<body hash>`.
    fn cursor_text(body: &QuarantinedBody) -> String {
        format!("{}.{}", body.first_seen_ms, body.body_hash)
    }

    fn parse_cursor(text: &str) -> Option<(i64, String)> {
        let (ms, hash) = text.split_once('.')?;
        Some((ms.parse().ok()?, hash.to_owned()))
    }

    fn page(bodies: &[QuarantinedBody], next: Option<String>) -> model::QuarantinePage {
        model::QuarantinePage {
            quarantine: bodies.iter().map(quarantined).collect(),
            next,
        }
    }

    async fn one(
        store: &dyn OperatorStore,
        hash: &String,
    ) -> Result<Option<QuarantinedBody>, StoreError> {
        store.quarantined(hash).await
    }

    async fn list(
        store: &dyn OperatorStore,
        filter: &QuarantineFilter,
        page: &Page<(i64, String)>,
    ) -> Result<Vec<QuarantinedBody>, StoreError> {
        store.list_quarantine(filter, page).await
    }

    async fn walk_end(_: &dyn OperatorStore) -> Result<End<(i64, String)>, StoreError> {
        Ok(End::Open)
    }

    async fn purge(store: &dyn OperatorStore, hashes: &[String]) -> Result<u64, StoreError> {
        store.remove_quarantined(hashes).await
    }
}

/// A quarantined body as the API lists it.
pub(super) fn quarantined(body: &QuarantinedBody) -> model::QuarantinedBody {
    model::QuarantinedBody {
        body_hash: body.body_hash.clone(),
        content_type: body.content_type.clone(),
        error: body.error.clone(),
        size: body.size,
        truncated: body.truncated,
        first_seen: time(body.first_seen_ms),
        last_seen: time(body.last_seen_ms),
        seen_count: body.seen_count,
    }
}

/// A listing's query parameters.
pub(super) struct Listing {
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    limit: usize,
    after: Option<String>,
    target: Option<String>,
    reason: Option<String>,
}

fn parse_listing(query: &str, allowed: &[&str]) -> Result<Listing, Refusal> {
    let mut listing = Listing {
        since_ms: None,
        until_ms: None,
        limit: DEFAULT_LIMIT,
        after: None,
        target: None,
        reason: None,
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        if !allowed.contains(&key.as_ref()) {
            return Err(bad_request(format!(
                "unknown parameter `{key}` (known: {})",
                allowed.join(", ")
            )));
        }
        match key.as_ref() {
            "since" => listing.since_ms = Some(parse_time("since", &value)?),
            "until" => listing.until_ms = Some(parse_time("until", &value)?),
            "limit" => {
                listing.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad_request(format!("`limit`: must be a number from 1 to {MAX_LIMIT}"))
                    })?
            }
            "after" => listing.after = Some(value),
            "target" => listing.target = Some(value),
            "reason" => listing.reason = Some(value),
            _ => unreachable!("checked against `allowed`"),
        }
    }
    Ok(listing)
}

/// `GET` a listing: one page, and the cursor of the next if there is one.
pub(super) async fn list<K: Kind>(admin: &Admin, query: &str) -> Result<K::Page, Refusal> {
    let listing = parse_listing(query, K::PARAMETERS)?;
    let after = match &listing.after {
        Some(cursor) => Some(K::parse_cursor(cursor).ok_or_else(|| {
            bad_request(format!("`after`: {cursor:?} is not a cursor from `next`"))
        })?),
        None => None,
    };
    // One more than asked tells whether another page follows.
    let page = Page {
        after,
        limit: listing.limit + 1,
    };
    let mut items = K::list(admin.store.as_ref(), &K::filter(&listing), &page).await?;
    let more = items.len() > listing.limit;
    items.truncate(listing.limit);
    let next = more.then(|| items.last().map(K::cursor_text)).flatten();
    Ok(K::page(&items, next))
}

/// What a selection resolved to.
enum Chosen<K: Kind> {
    /// Listed keys, handed out a chunk at a time from `position`.
    Keys { keys: Vec<K::Key>, position: usize },
    /// What the filter matches.
    Filter(K::Filter),
}

/// The items a replay or purge chose, a chunk at a time.
pub(super) struct Walk<K: Kind> {
    chosen: Chosen<K>,
    after: Option<K::Cursor>,
    /// A filter's end, read on the first step.
    end: Option<End<K::Cursor>>,
    /// Keys asked for that are not there (a typo, or gone meanwhile).
    pub(super) missing: Vec<K::Key>,
}

impl<K: Kind> Walk<K> {
    /// The walk over what `body` chooses: exactly one of listed keys, a
    /// filter or `all`.
    pub(super) fn choose(body: Value) -> Result<Walk<K>, Refusal> {
        let selection: K::Selection = serde_json::from_value(body)
            .map_err(|err| bad_request(format!("{}: {err}", K::SELECTION)))?;
        let Parts { keys, filter, all } = K::split(selection)?;
        let filtered = filter != K::Filter::default();
        let chosen = match (!keys.is_empty(), filtered, all) {
            (true, false, false) => Chosen::Keys { keys, position: 0 },
            (false, true, false) | (false, false, true) => Chosen::Filter(filter),
            (false, false, false) => return Err(bad_request(SAY_WHICH)),
            _ => return Err(bad_request(format!("give only one of them: {SAY_WHICH}"))),
        };
        Ok(Walk {
            chosen,
            after: None,
            end: None,
            missing: Vec::new(),
        })
    }

    /// The next chunk, or None when the walk is done.
    pub(super) async fn next(
        &mut self,
        store: &dyn OperatorStore,
    ) -> Result<Option<Vec<K::Item>>, Refusal> {
        match &mut self.chosen {
            Chosen::Keys { keys, position } => {
                let start = (*position).min(keys.len());
                let stop = (start + CHUNK).min(keys.len());
                *position = stop;
                if start == stop {
                    return Ok(None);
                }
                let mut items = Vec::with_capacity(stop - start);
                for key in &keys[start..stop] {
                    match K::one(store, key).await? {
                        Some(item) => items.push(item),
                        None => self.missing.push(key.clone()),
                    }
                }
                Ok(Some(items))
            }
            Chosen::Filter(filter) => {
                let end = match &self.end {
                    Some(end) => end.clone(),
                    None => self.end.insert(K::walk_end(store).await?).clone(),
                };
                if let End::Empty = end {
                    return Ok(None);
                }
                let page = Page {
                    after: self.after.clone(),
                    limit: CHUNK,
                };
                let mut items = K::list(store, filter, &page).await?;
                if let End::At(last) = &end {
                    items.retain(|item| K::cursor(item) <= *last);
                }
                let Some(last) = items.last() else {
                    return Ok(None);
                };
                self.after = Some(K::cursor(last));
                Ok(Some(items))
            }
        }
    }
}

/// `POST .../purge`: deletes what the body chooses.
pub(super) async fn purge<K: Kind>(admin: &Admin, body: Value) -> Result<Purged<K::Key>, Refusal> {
    let mut walk = Walk::<K>::choose(body)?;
    let mut purged = 0u64;
    while let Some(items) = walk.next(admin.store.as_ref()).await? {
        let keys: Vec<K::Key> = items.iter().map(K::key).collect();
        purged += K::purge(admin.store.as_ref(), &keys).await?;
    }
    if purged > 0 {
        tracing::warn!(purged, "{} purged by an operator", K::PLURAL);
    }
    Ok(Purged {
        purged,
        not_found: walk.missing,
    })
}

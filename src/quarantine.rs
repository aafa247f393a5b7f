//! The quarantine: bodies the parser (or the database) refused, kept so
//! nothing Sinch sent is lost. Operators list them and, once the parser is fixed (or the sender's
//! mistake understood), re-ingest them: a body that now parses is routed and
//! committed exactly as if it had just arrived (with its first arrival as the
//! receive time), then leaves the quarantine. Beyond `quarantine.max_bytes`
//! only a body's prefix is kept: such a body is never replayed (a prefix is
//! not what Sinch sent).

use crate::ingest::prepare;
use crate::postback;
use crate::routing::Router;
use crate::store::{Acceptance, Committer, OperatorStore, QuarantinedBody, StoreError};

/// What replaying one body did; the admin API reports it as it is (under
/// `outcome`, see `admin::model::ReplayOutcome`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[schema(as = ReplayOutcome)]
pub enum Replayed {
    /// Parsed and committed under a new envelope id.
    Accepted {
        /// The new envelope id.
        id: String,
        /// Targets it was routed to (empty: kept as a "no route" dead letter).
        targets: Vec<String>,
    },
    /// Parsed, but the same postback was accepted already.
    Duplicate {
        /// The id it was accepted under.
        original_id: String,
    },
    /// Still not a postback (or still refused by the database); it stays in
    /// the quarantine.
    StillInvalid {
        /// Today's parse (or database) error.
        error: String,
    },
    /// Only its prefix was kept (the budget was spent): refused, it stays.
    Truncated {
        /// Why it cannot be replayed.
        error: String,
    },
}

/// Re-ingests one quarantined body: when it now parses, it is routed and
/// committed (or found a duplicate) and leaves the quarantine; when it still
/// fails, it stays.
pub async fn replay_body(
    committer: &Committer,
    store: &dyn OperatorStore,
    router: &Router,
    source: &str,
    body: &QuarantinedBody,
) -> Result<Replayed, StoreError> {
    if body.truncated {
        return Ok(Replayed::Truncated {
            error: format!(
                "only the first {} of its {} bytes were kept (quarantine.max_bytes was reached): \
                 it cannot be replayed; ask the sender to send it again",
                body.body.len(),
                body.size
            ),
        });
    }
    let parsed = match postback::parse(&body.body, body.content_type.as_deref()) {
        Err(err) => {
            return Ok(Replayed::StillInvalid {
                error: err.to_string(),
            })
        }
        Ok(parsed) => parsed,
    };
    let (new, decision) = prepare(
        &parsed,
        body.body.clone(),
        body.content_type.clone(),
        body.first_seen_ms,
        router,
        source,
    );
    let id = new.id.clone();
    let outcome = match committer.accept(new).await {
        Ok(Acceptance::Accepted) => Replayed::Accepted {
            id,
            targets: decision.targets,
        },
        Ok(Acceptance::Duplicate { original_id }) => Replayed::Duplicate { original_id },
        // The database still refuses it: it stays.
        Err(StoreError::Refused { message, .. }) => {
            return Ok(Replayed::StillInvalid { error: message })
        }
        Err(err) => return Err(err),
    };
    // Committed (or already there): the quarantine copy is done with.
    store
        .remove_quarantined(std::slice::from_ref(&body.body_hash))
        .await?;
    Ok(outcome)
}

//! The two events of the contract and how they are read from JSON.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::group::Group;
use super::validate::{self, ValidationError};

/// A real-time event as the contract defines it; serialized with its `type` discriminator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum Event {
    /// Recommendations for a job were computed; dispatchers refetch the ranked list over HTTP.
    RecommendationReady(RecommendationReady),
    /// A job was assigned; job and contractor views update.
    JobAssigned(JobAssigned),
}

/// The closed set of event names, which are also the SignalR client method names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `RecommendationReady`.
    RecommendationReady,
    /// `JobAssigned`.
    JobAssigned,
}

/// Payload of `RecommendationReady`, sent to `/dispatch/{region}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecommendationReady {
    /// The job whose recommendations are ready.
    #[serde(deserialize_with = "validate::uuid")]
    pub job_id: Uuid,
    /// Correlates with the `POST /recommendations` call that asked for them.
    #[serde(deserialize_with = "validate::uuid")]
    pub request_id: Uuid,
    /// Region of the job; names the dispatch group.
    pub region: String,
    /// Version of the scoring configuration, for cache busting.
    pub config_version: u32,
    /// When the recommendations were generated (UTC).
    #[serde(deserialize_with = "validate::utc_timestamp")]
    pub generated_at: DateTime<Utc>,
}

/// Payload of `JobAssigned`, sent to `/dispatch/{region}` and `/contractor/{contractorId}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobAssigned {
    /// The job that was assigned.
    #[serde(deserialize_with = "validate::uuid")]
    pub job_id: Uuid,
    /// The contractor it was assigned to; names the contractor group.
    #[serde(deserialize_with = "validate::uuid")]
    pub contractor_id: Uuid,
    /// The assignment record.
    #[serde(deserialize_with = "validate::uuid")]
    pub assignment_id: Uuid,
    /// Start of the assigned slot (UTC).
    #[serde(deserialize_with = "validate::utc_timestamp")]
    pub start_utc: DateTime<Utc>,
    /// End of the assigned slot (UTC), after `start_utc`.
    #[serde(deserialize_with = "validate::utc_timestamp")]
    pub end_utc: DateTime<Utc>,
    /// Region of the job; names the dispatch group.
    pub region: String,
    /// Whether the assignment was made automatically or by a dispatcher.
    pub source: Source,
    /// Links to the audit record of the recommendation.
    #[serde(deserialize_with = "validate::uuid")]
    pub audit_id: Uuid,
}

/// Who made an assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Assigned by the scheduler on its own.
    Auto,
    /// Assigned by a dispatcher.
    Manual,
}

impl Event {
    /// Reads and validates an event from its JSON encoding.
    ///
    /// Fields the contract does not name are allowed and ignored here (a newer backend may add
    /// them); the caller forwards the original bytes, so they reach browsers unchanged.
    ///
    /// # Errors
    /// [`ValidationError`] naming the field and the rule that failed.
    pub fn from_json(json: &[u8]) -> Result<Self, ValidationError> {
        validate::size(json.len())?;
        let kind = validate::kind(json)?;
        let event = match kind {
            EventKind::RecommendationReady => Self::RecommendationReady(validate::fields(json)?),
            EventKind::JobAssigned => Self::JobAssigned(validate::fields(json)?),
        };
        event.check_rules()?;
        Ok(event)
    }

    /// Encodes the event as compact JSON, with its `type` discriminator.
    ///
    /// # Errors
    /// [`ValidationError`] when the event breaks a rule of the contract (a bad region, an end
    /// before the start, an encoding over [`super::MAX_EVENT_BYTES`]).
    pub fn to_json(&self) -> Result<Vec<u8>, ValidationError> {
        self.check_rules()?;
        let json = serde_json::to_vec(self).expect("contract events always serialize to JSON");
        validate::size(json.len())?;
        Ok(json)
    }

    /// Which of the two events this is.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::RecommendationReady(_) => EventKind::RecommendationReady,
            Self::JobAssigned(_) => EventKind::JobAssigned,
        }
    }

    /// The routing rule: the groups this event is delivered to.
    ///
    /// `RecommendationReady` goes to `/dispatch/{region}`; `JobAssigned` to `/dispatch/{region}`
    /// and `/contractor/{contractorId}`. Regions are checked when the event is read, so this
    /// cannot fail for an event built by [`Event::from_json`].
    pub fn groups(&self) -> Vec<Group> {
        match self {
            Self::RecommendationReady(e) => Group::try_dispatch(&e.region).into_iter().collect(),
            Self::JobAssigned(e) => Group::try_dispatch(&e.region)
                .into_iter()
                .chain(Group::try_contractor(&e.contractor_id.to_string()))
                .collect(),
        }
    }

    /// The event's own unique id, the default idempotency key: `requestId` for
    /// `RecommendationReady`, `assignmentId` for `JobAssigned` (hyphenated lowercase UUID).
    pub fn unique_id(&self) -> String {
        match self {
            Self::RecommendationReady(e) => e.request_id,
            Self::JobAssigned(e) => e.assignment_id,
        }
        .hyphenated()
        .to_string()
    }

    fn check_rules(&self) -> Result<(), ValidationError> {
        match self {
            Self::RecommendationReady(e) => validate::region(&e.region),
            Self::JobAssigned(e) => {
                validate::region(&e.region)?;
                validate::slot(e.start_utc, e.end_utc)
            }
        }
    }
}

impl EventKind {
    /// Every kind, in contract order.
    pub const ALL: [EventKind; 2] = [EventKind::RecommendationReady, EventKind::JobAssigned];

    /// The `type` discriminator, which is also the SignalR target the browser subscribes to.
    pub fn name(self) -> &'static str {
        match self {
            Self::RecommendationReady => "RecommendationReady",
            Self::JobAssigned => "JobAssigned",
        }
    }

    /// The kind named by a `type` discriminator, exactly as the contract spells it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

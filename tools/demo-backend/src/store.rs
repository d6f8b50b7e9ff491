//! What the demo remembers, in memory: the seed contractors and jobs of three regions, the
//! latest recommendations per job and the assignments, with a deterministic pseudo-score.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::error::ApiError;

/// Regions of the seed data, in display order.
pub(crate) const REGIONS: [&str; 3] = ["west", "east", "north"];

/// The in-memory data of the demo.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) contractors: Vec<Contractor>,
    pub(crate) jobs: Vec<Job>,
    /// Latest recommendations per job.
    pub(crate) recommendations: HashMap<Uuid, Recommendations>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Contractor {
    pub(crate) contractor_id: Uuid,
    pub(crate) name: String,
    pub(crate) region: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Job {
    pub(crate) job_id: Uuid,
    pub(crate) region: String,
    pub(crate) title: String,
    pub(crate) status: JobStatus,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub(crate) assignment: Option<Assignment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobStatus {
    Open,
    Assigned,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Assignment {
    pub(crate) contractor_id: Uuid,
    pub(crate) assignment_id: Uuid,
    pub(crate) start_utc: DateTime<Utc>,
    pub(crate) end_utc: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Recommendations {
    pub(crate) job_id: Uuid,
    pub(crate) request_id: Uuid,
    pub(crate) ranked: Vec<Ranked>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Ranked {
    pub(crate) contractor_id: Uuid,
    pub(crate) name: String,
    pub(crate) score: u32,
}

impl Store {
    /// Fixed seed data: three contractors and four jobs per region, with stable ids
    /// (`c0000000-…` contractors, `a0000000-…` jobs) so tests and bookmarks can name them.
    pub(crate) fn seed() -> Self {
        const NAMES: [&str; 9] = [
            "Ada Alvarez",
            "Ben Brooks",
            "Cleo Chen",
            "Dev Dalton",
            "Eli Evans",
            "Fay Fischer",
            "Gus Green",
            "Hana Hill",
            "Ivo Ivanov",
        ];
        const TITLES: [&str; 4] = [
            "Replace water heater",
            "Fix leaking roof",
            "Install ceiling fan",
            "Repair garage door",
        ];
        let mut contractors = Vec::new();
        let mut jobs = Vec::new();
        for (r, region) in (0u128..).zip(REGIONS) {
            for c in 0..3 {
                contractors.push(Contractor {
                    contractor_id: seed_id(0xc, r * 16 + c + 1),
                    name: NAMES[usize::try_from(r * 3 + c).unwrap_or_default()].to_owned(),
                    region: region.to_owned(),
                });
            }
            for (j, title) in (0u128..).zip(TITLES) {
                jobs.push(Job {
                    job_id: seed_id(0xa, r * 16 + j + 1),
                    region: region.to_owned(),
                    title: format!("{title} ({region})"),
                    status: JobStatus::Open,
                    assignment: None,
                });
            }
        }
        Self {
            contractors,
            jobs,
            recommendations: HashMap::new(),
        }
    }

    pub(crate) fn job(&self, id: Uuid) -> Result<&Job, ApiError> {
        self.jobs
            .iter()
            .find(|job| job.job_id == id)
            .ok_or_else(|| ApiError::bad_request(format!("unknown job {id}")))
    }

    pub(crate) fn contractor(&self, id: Uuid) -> Result<&Contractor, ApiError> {
        self.contractors
            .iter()
            .find(|c| c.contractor_id == id)
            .ok_or_else(|| ApiError::bad_request(format!("unknown contractor {id}")))
    }

    /// The contractors of the job's region, best first, with a deterministic pseudo-score.
    pub(crate) fn rank(&self, job: &Job) -> Vec<Ranked> {
        let mut ranked: Vec<Ranked> = self
            .contractors
            .iter()
            .filter(|c| c.region == job.region)
            .map(|c| Ranked {
                contractor_id: c.contractor_id,
                name: c.name.clone(),
                score: pseudo_score(job.job_id, c.contractor_id),
            })
            .collect();
        ranked.sort_by(|a, b| {
            b.score
                .cmp(&a.score)
                .then(a.contractor_id.cmp(&b.contractor_id))
        });
        ranked
    }
}

/// `{prefix}0000000-0000-4000-8000-{n:012x}`: a valid, readable v4-shaped UUID.
pub(crate) fn seed_id(prefix: u128, n: u128) -> Uuid {
    Uuid::from_u128((prefix << 124) | (0x4000 << 64) | (0x8000 << 48) | n)
}

/// A score from 50 to 99 that depends only on the pair (FNV-1a over both ids).
pub(crate) fn pseudo_score(job: Uuid, contractor: Uuid) -> u32 {
    let hash = job
        .as_bytes()
        .iter()
        .chain(contractor.as_bytes())
        .fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        });
    50 + hash % 50
}

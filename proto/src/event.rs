//! What a device records about its own transitions, each with a sequence
//! number, kept until the hub has it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Grows by one per event on a device; never reused.
    pub seq: u64,
    /// Unix milliseconds.
    pub at: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    /// A desired state was stored (and flushed) on the device.
    Applied { generation: u64 },
    /// A desired state was refused; the running state is untouched.
    Rejected { reason: String },
    /// A desired state was refused because a deployment's signatures do not
    /// verify against the device's trusted root: it was not stored, the
    /// running state is untouched.
    Refused { generation: u64, reason: String },
    /// A deployment's revision was started on the device.
    RevisionStarted { deployment: String, revision: u64 },
    /// Its workloads stayed up and healthy through the rollback window.
    Healthy { deployment: String, revision: u64 },
    /// A workload of the revision failed: crash loop, failed probe, failed start.
    Failed { deployment: String, revision: u64, workload: String, reason: String },
    /// The device returned the deployment to its previous revision by itself.
    RolledBack { deployment: String, from_revision: u64, to_revision: u64, reason: String },
    /// The agent confirmed itself healthy running the update `target`
    /// `version`; `from` names the deployment revision that asked for it
    /// (none for `edge-agent update`).
    Updated {
        target: String,
        version: String,
        #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
        from: Option<UpdateOrigin>,
    },
    /// The agent update `target` `version` did not confirm itself healthy in
    /// its boots; the previous agent binary runs again.
    UpdateRolledBack {
        target: String,
        version: String,
        reason: String,
        #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
        from: Option<UpdateOrigin>,
    },
    /// A deployment's agent update was refused before anything was installed
    /// (metadata, version, hardware or digest); the running agent stays and
    /// the revision is not tried again.
    UpdateFailed { target: String, version: String, reason: String, deployment: String, revision: u64 },
}

/// The deployment revision an agent update was installed for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOrigin {
    pub deployment: String,
    pub revision: u64,
}

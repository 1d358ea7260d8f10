//! A device's desired state: what it should run, grouped by the deployment
//! that asked for it, with a generation that only grows.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::workload::{SpecError, WorkloadSpec};

/// The document version this code reads and writes.
pub const DESIRED_STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DesiredState {
    /// Version of this document's schema.
    pub version: u32,
    /// Grows with every change; a device never goes back to a lower one.
    pub generation: u64,
    #[serde(default)]
    pub deployments: Vec<Deployment>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Deployment {
    pub name: String,
    /// Grows with every change of this deployment's workloads.
    pub revision: u64,
    /// After a new revision starts, how long its workloads must stay up and
    /// healthy; a crash loop or a failed probe within it rolls the deployment
    /// back to its previous revision, on the device, with no hub.
    #[serde(default = "default_rollback_window", with = "humantime_serde")]
    pub rollback_window: Duration,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// An agent update instead of workloads: the device installs this
    /// signed target as its own binary (docs/trust.md, "Agent updates in
    /// rollouts"). Left out when unset, so existing signatures stay valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<AgentUpdate>,
    /// Names of workloads the hub left out on this device because a
    /// deployment of higher priority owns them. Not signed: the hub decides
    /// it per device, and it can only take workloads away.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
    /// The operator's signatures over this deployment without `signatures`
    /// and `excluded` (docs/trust.md, "Signed deployments").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<Signature>,
}

/// A TUF target to install as the agent, and the version the operator
/// expects it to be: the device refuses the target if the repository names
/// another version, so metadata and deployment must agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentUpdate {
    pub target: String,
    pub version: String,
}

impl AgentUpdate {
    pub fn validate(&self) -> Result<(), String> {
        if self.target.trim().is_empty() || self.version.trim().is_empty() {
            return Err("an agent update needs a `target` (the TUF target's name) and its `version`".into());
        }
        Ok(())
    }
}

/// A signature over a document's canonical JSON, as TUF metadata carries it.
/// Here, not in `ota`, so that both the documents and the trust crate use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The signing key's id (hex SHA-256 of its public key).
    pub keyid: String,
    /// The Ed25519 signature, lowercase hex.
    pub sig: String,
}

impl Deployment {
    /// The workloads this device runs for the deployment: all but the excluded.
    pub fn active_workloads(&self) -> impl Iterator<Item = &WorkloadSpec> {
        self.workloads.iter().filter(|w| !self.excluded.contains(&w.name))
    }
}

fn default_rollback_window() -> Duration {
    Duration::from_secs(120)
}

#[derive(Debug, thiserror::Error)]
pub enum DesiredStateError {
    #[error("cannot parse the desired state: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("cannot parse the desired state: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the desired state has version {found}, and this agent reads version {DESIRED_STATE_VERSION}: update the agent, or write the document for version {DESIRED_STATE_VERSION}")]
    UnknownVersion { found: u32 },
    #[error("the desired state is invalid: {0}")]
    Invalid(String),
    #[error("in deployment `{deployment}`: {source}")]
    Workload { deployment: String, source: SpecError },
}

impl DesiredState {
    /// Parses TOML, or JSON when the text starts with `{`, then validates.
    pub fn parse(text: &str) -> Result<Self, DesiredStateError> {
        // The version first, so that a newer document gets the version error
        // rather than a complaint about a field it added.
        #[derive(Deserialize)]
        struct Version {
            version: Option<u32>,
        }
        let json = text.trim_start().starts_with('{');
        let version = if json {
            serde_json::from_str::<Version>(text)?.version
        } else {
            toml::from_str::<toml::Table>(text)?.get("version").and_then(|v| v.as_integer()).map(|v| v as u32)
        };
        match version {
            Some(DESIRED_STATE_VERSION) => {}
            Some(found) => return Err(DesiredStateError::UnknownVersion { found }),
            None => return Err(DesiredStateError::Invalid("`version` is missing (write `version = 1`)".into())),
        }
        let state: Self = if json { serde_json::from_str(text)? } else { toml::from_str(text)? };
        state.validate()?;
        Ok(state)
    }

    pub fn validate(&self) -> Result<(), DesiredStateError> {
        if self.version != DESIRED_STATE_VERSION {
            return Err(DesiredStateError::UnknownVersion { found: self.version });
        }
        let invalid = |m: String| Err(DesiredStateError::Invalid(m));
        let mut deployments = BTreeSet::new();
        let mut workloads = BTreeSet::new();
        let mut updates = self.deployments.iter().filter(|d| d.update.is_some()).map(|d| d.name.as_str());
        if let (Some(first), Some(second)) = (updates.next(), updates.next()) {
            return invalid(format!(
                "deployments `{first}` and `{second}` both update the agent: a device runs one agent, so one deployment may carry an update"
            ));
        }
        for d in &self.deployments {
            if let Some(update) = &d.update {
                update.validate().map_err(|m| DesiredStateError::Invalid(format!("deployment `{}`: {m}", d.name)))?;
                if !d.workloads.is_empty() {
                    return invalid(format!(
                        "deployment `{}` has both an agent update and workloads: put them in two deployments, so each is judged on its own",
                        d.name
                    ));
                }
            }
            if let Some(name) = d.excluded.iter().find(|name| !d.workloads.iter().any(|w| &&w.name == name)) {
                return invalid(format!("deployment `{}` excludes workload `{name}`, which it does not have", d.name));
            }
            if !crate::workload::valid_name(&d.name) {
                return invalid(format!("deployment name {:?} is not valid (a-z, 0-9, `_`, `.`, `-`)", d.name));
            }
            if !deployments.insert(d.name.as_str()) {
                return invalid(format!("deployment `{}` appears twice", d.name));
            }
            for w in &d.workloads {
                w.validate().map_err(|source| DesiredStateError::Workload { deployment: d.name.clone(), source })?;
            }
            // A name may appear in several deployments when all but one exclude it.
            for w in d.active_workloads() {
                if !workloads.insert(w.name.as_str()) {
                    return invalid(format!(
                        "workload `{}` appears twice (names are unique on a device, across deployments)",
                        w.name
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn deployment(&self, name: &str) -> Option<&Deployment> {
        self.deployments.iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
version = 1
generation = 4

[[deployments]]
name = "monitoring"
revision = 2

[[deployments.workloads]]
name = "node-exporter"
image = "exporter:1"

[[deployments]]
name = "app"
revision = 7
rollback-window = "30s"

[[deployments.workloads]]
name = "web"
image = "web:7"
update-strategy = "start-first"
"#;

    #[test]
    fn desired_state_parses_with_deployments_and_defaults() {
        let state = DesiredState::parse(DOC).unwrap();
        assert_eq!(state.generation, 4);
        assert_eq!(state.deployment("app").unwrap().rollback_window, Duration::from_secs(30));
        assert_eq!(state.deployment("monitoring").unwrap().rollback_window, Duration::from_secs(120));
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(DesiredState::parse(&json).unwrap(), state);
    }

    #[test]
    fn unknown_version_is_refused_before_anything_else() {
        let err = DesiredState::parse("version = 2\ngeneration = 1\nnew-field = true\n").unwrap_err().to_string();
        assert!(err.contains("version 2") && err.contains("update the agent"), "{err}");
        let err = DesiredState::parse("generation = 1\n").unwrap_err().to_string();
        assert!(err.contains("`version` is missing"), "{err}");
    }

    #[test]
    fn duplicate_workload_names_across_deployments_are_refused() {
        let doc = DOC.replace("name = \"node-exporter\"", "name = \"web\"");
        let err = DesiredState::parse(&doc).unwrap_err().to_string();
        assert!(err.contains("workload `web` appears twice"), "{err}");
    }

    #[test]
    fn a_workload_in_two_deployments_is_accepted_when_all_but_one_exclude_it() {
        let doc = DOC.replace("name = \"node-exporter\"", "name = \"web\"");
        let mut state: DesiredState = toml::from_str(&doc).unwrap();
        state.deployments[0].excluded = vec!["web".into()];
        state.validate().unwrap();
        assert_eq!(state.deployments[0].active_workloads().count(), 0);
        assert_eq!(state.deployments[1].active_workloads().count(), 1);
        state.deployments[0].excluded = vec!["db".into()];
        let err = state.validate().unwrap_err().to_string();
        assert!(err.contains("excludes workload `db`, which it does not have"), "{err}");
    }

    #[test]
    fn duplicate_deployments_and_bad_workloads_are_refused_naming_them() {
        let doc = DOC.replace("name = \"monitoring\"", "name = \"app\"");
        assert!(DesiredState::parse(&doc).unwrap_err().to_string().contains("deployment `app` appears twice"));
        let doc = DOC.replace("image = \"web:7\"", "image = \"web:7\"\nuser = \"www-data\"");
        let err = DesiredState::parse(&doc).unwrap_err().to_string();
        assert!(err.contains("deployment `app`") && err.contains("numeric uid"), "{err}");
    }

    #[test]
    fn an_agent_update_is_a_deployment_of_its_own_and_one_per_device() {
        let update = "\n[[deployments]]\nname = \"agent\"\nrevision = 1\nupdate = { target = \"edge-agent-2\", version = \"2.0\" }\n";
        let state = DesiredState::parse(&format!("{DOC}{update}")).unwrap();
        let agent = state.deployment("agent").unwrap();
        assert_eq!(agent.update, Some(AgentUpdate { target: "edge-agent-2".into(), version: "2.0".into() }));
        let json = serde_json::to_string(&state.deployments[0]).unwrap();
        assert!(!json.contains("\"update\""), "left out when unset: {json}");

        let twice = format!("{DOC}{update}{}", update.replace("\"agent\"", "\"agent-b\""));
        let err = DesiredState::parse(&twice).unwrap_err().to_string();
        assert!(err.contains("`agent` and `agent-b` both update the agent"), "{err}");
        let with_workloads =
            DOC.replace("revision = 7\n", "revision = 7\nupdate = { target = \"a\", version = \"1\" }\n");
        let err = DesiredState::parse(&with_workloads).unwrap_err().to_string();
        assert!(err.contains("both an agent update and workloads"), "{err}");
        let err = DesiredState::parse(&format!("{DOC}{}", update.replace("edge-agent-2", ""))).unwrap_err().to_string();
        assert!(err.contains("needs a `target`"), "{err}");
    }

    #[test]
    fn malformed_document_is_refused_with_the_parser_position() {
        let err = DesiredState::parse("version = 1\ngeneration = \"four\"\n").unwrap_err().to_string();
        assert!(err.contains("generation"), "{err}");
    }
}

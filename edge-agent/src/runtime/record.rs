//! The resolved workload as the agent hands it to its shim: the operator's
//! spec plus what the agent decided (image digest, layers, cgroup, log limits).

use std::path::{Path, PathBuf};

use outpost_proto::WorkloadSpec;
use serde::{Deserialize, Serialize};

use super::paths::write_atomic;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub spec: WorkloadSpec,
    /// sha256 of the spec: a changed spec is a new instance.
    pub spec_hash: String,
    /// The deployment revision that asked for it; `None` for a workload run by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentRef>,
    /// The reference the spec named, and the manifest digest it resolved to.
    pub image: String,
    pub image_digest: String,
    /// Unpacked image layers, base first.
    pub layers: Vec<PathBuf>,
    pub cgroups_path: String,
    pub log_max_size: u64,
    pub log_files: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRef {
    pub name: String,
    pub revision: u64,
}

/// sha256 of the spec's JSON form; field order is fixed and maps are sorted, so equal specs hash alike.
pub fn spec_hash(spec: &WorkloadSpec) -> String {
    ota::Digest::of(&serde_json::to_vec(spec).expect("a workload spec always serializes")).hex()
}

/// A workload's instance id: its name and the start of its spec hash. Each
/// version of a workload is its own container, so a replacement can start
/// before the old one stops, and a crash mid-update leaves instances that
/// say which version they are.
pub fn instance_id(spec: &WorkloadSpec) -> String {
    format!("{}-{}", spec.name, &spec_hash(spec)[..8])
}

impl WorkloadRecord {
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        write_atomic(path, &serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)
    }
}

//! The resolved workload as the agent hands it to its shim: the operator's
//! spec plus what the agent decided (image digest, layers, cgroup, log limits).

use std::path::{Path, PathBuf};

use outpost_proto::WorkloadSpec;
use serde::{Deserialize, Serialize};

use super::paths::write_atomic;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub spec: WorkloadSpec,
    /// The reference the spec named, and the manifest digest it resolved to.
    pub image: String,
    pub image_digest: String,
    /// Unpacked image layers, base first.
    pub layers: Vec<PathBuf>,
    pub cgroups_path: String,
    pub log_max_size: u64,
    pub log_files: u32,
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

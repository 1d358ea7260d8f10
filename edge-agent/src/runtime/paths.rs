//! The agent's on-disk layout, in one place.
//!
//! `data` (default /var/lib/outpost) survives reboots: images, workload specs,
//! writable layers, volumes, logs. `run` (default /run/outpost) is a tmpfs that
//! a reboot empties: libcontainer's state and the shims' status files, which
//! describe processes and mean nothing after a reboot.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Paths {
    pub data: PathBuf,
    pub run: PathBuf,
}

impl Paths {
    pub fn new(data: impl Into<PathBuf>, run: impl Into<PathBuf>) -> Self {
        Self { data: data.into(), run: run.into() }
    }

    pub fn images(&self) -> PathBuf {
        self.data.join("images")
    }

    pub fn volumes(&self) -> PathBuf {
        self.data.join("volumes")
    }

    pub fn workloads(&self) -> PathBuf {
        self.data.join("workloads")
    }

    pub fn workload(&self, name: &str) -> WorkloadPaths {
        WorkloadPaths { dir: self.workloads().join(name), run: self.run.join("workloads").join(name) }
    }

    /// libcontainer's state root: one directory per container id.
    pub fn containers(&self) -> PathBuf {
        self.run.join("containers")
    }
}

/// Where one workload keeps its files.
#[derive(Debug, Clone)]
pub struct WorkloadPaths {
    pub dir: PathBuf,
    pub run: PathBuf,
}

impl WorkloadPaths {
    /// The resolved workload (spec, image digest, generated OCI spec) as the shim runs it.
    pub fn record(&self) -> PathBuf {
        self.dir.join("workload.json")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.bundle().join("rootfs")
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn status(&self) -> PathBuf {
        self.run.join("status.json")
    }
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
}

/// Writes a file so that a crash leaves either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

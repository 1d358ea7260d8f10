//! The agent's side of the runtime: prepares a workload's bundle, starts its
//! shim, reads what the shims report, stops and removes workloads.
//!
//! The agent never creates containers itself (it is multi-threaded; see
//! shim.rs). It may call libcontainer's kill and delete, which do not fork,
//! to clean up after a shim that died.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use outpost_proto::WorkloadSpec;
use serde::Serialize;

use super::cgroups::{self, MissingController};
use super::image::Image;
use super::paths::{write_atomic, Paths};
use super::record::{instance_id, spec_hash, DeploymentRef, WorkloadRecord};
use super::rootfs;
use super::spec::{self, LinuxHost, SpecContext, SpecGenError};
use super::status::{State, WorkloadStatus};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("running workloads needs root (namespaces, cgroups, mounts): run edge-agent as root")]
    NotRoot,
    #[error("workload `{0}` already exists: remove it first with `edge-agent rm {0}`")]
    AlreadyExists(String),
    #[error("`{name}` names several instances ({instances}): give the instance id")]
    Ambiguous { name: String, instances: String },
    #[error("workload `{0}` is already running (stop it first with `edge-agent stop {0}`)")]
    AlreadyRunning(String),
    #[error("no workload named `{0}` (see `edge-agent ps`)")]
    NotFound(String),
    #[error(transparent)]
    Limits(#[from] MissingController),
    #[error(transparent)]
    Spec(#[from] SpecGenError),
    #[error("workload `{name}` did not start: {reason}")]
    StartFailed { name: String, reason: String },
    #[error("workload `{name}`: {action}: {source}")]
    Io { name: String, action: &'static str, source: std::io::Error },
}

/// Settings the operator chooses for every workload on the device.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// cgroup under which every workload's cgroup is made.
    pub cgroup_parent: String,
    pub log_max_size: u64,
    pub log_files: u32,
    /// The edge-agent binary, re-executed as each workload's shim.
    pub shim_binary: PathBuf,
}

/// What `ps` shows of one workload instance.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadInfo {
    pub instance: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentRef>,
    pub spec_hash: String,
    pub image: String,
    pub image_digest: String,
    /// `lost` when the shim that reported it is gone: its container may still
    /// run, unsupervised, until `edge-agent rm` cleans it up.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<WorkloadStatus>,
}

#[derive(Clone)]
pub struct Supervisor {
    paths: Paths,
    settings: RuntimeSettings,
}

impl Supervisor {
    pub fn new(paths: Paths, settings: RuntimeSettings) -> Self {
        Self { paths, settings }
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Writes the instance's OCI bundle and record; returns its instance id. Nothing runs yet.
    pub fn create(
        &self,
        spec: &WorkloadSpec,
        image: &Image,
        deployment: Option<DeploymentRef>,
    ) -> Result<String, RuntimeError> {
        require_root()?;
        let name = instance_id(spec);
        let workload = self.paths.workload(&name);
        if workload.record().exists() {
            return Err(RuntimeError::AlreadyExists(name));
        }
        cgroups::check_limits_on_this_kernel(spec)?;
        let io = |action: &'static str| {
            let name = name.clone();
            move |source| RuntimeError::Io { name, action, source }
        };
        let cgroups_path = format!("/{}/{}", self.settings.cgroup_parent.trim_matches('/'), name);
        let oci = spec::generate(
            spec,
            &image.config,
            &SpecContext {
                rootfs: &workload.rootfs(),
                volumes: &self.paths.volumes(),
                cgroups_path: cgroups_path.clone(),
                host: &LinuxHost,
            },
        )?;
        std::fs::create_dir_all(workload.bundle()).map_err(io("create its directory"))?;
        for volume in spec.mounts.iter().filter_map(|m| m.volume.as_ref()) {
            std::fs::create_dir_all(self.paths.volumes().join(volume)).map_err(io("create its volume"))?;
        }
        let config = serde_json::to_vec_pretty(&oci).map_err(|e| io("write its OCI spec")(std::io::Error::other(e)))?;
        write_atomic(&workload.bundle().join("config.json"), &config).map_err(io("write its OCI spec"))?;
        let record = WorkloadRecord {
            spec: spec.clone(),
            spec_hash: spec_hash(spec),
            deployment,
            image: image.reference.clone(),
            image_digest: image.digest.clone(),
            layers: image.layers.clone(),
            cgroups_path,
            log_max_size: self.settings.log_max_size,
            log_files: self.settings.log_files,
        };
        // The record last: a workload directory without one is a crashed create.
        record.write(&workload.record()).map_err(io("write its record"))?;
        Ok(name)
    }

    /// The instance id for what an operator typed: an instance id, or a
    /// workload name with one instance.
    pub fn resolve(&self, name: &str) -> Result<String, RuntimeError> {
        if self.paths.workload(name).record().exists() {
            return Ok(name.to_string());
        }
        let matches: Vec<String> = self.list().into_iter().filter(|w| w.name == name).map(|w| w.instance).collect();
        match matches.as_slice() {
            [] => Err(RuntimeError::NotFound(name.to_string())),
            [one] => Ok(one.clone()),
            many => Err(RuntimeError::Ambiguous { name: name.to_string(), instances: many.join(", ") }),
        }
    }

    /// Starts the workload's shim and waits until the container runs. Returns its pid.
    pub fn start(&self, name: &str) -> Result<i32, RuntimeError> {
        require_root()?;
        let workload = self.paths.workload(name);
        if !workload.record().exists() {
            return Err(RuntimeError::NotFound(name.to_string()));
        }
        if let Ok(status) = WorkloadStatus::read(&workload.status()) {
            if status.shim_alive() {
                return Err(RuntimeError::AlreadyRunning(name.to_string()));
            }
        }
        let io = |action: &'static str| move |source| RuntimeError::Io { name: name.to_string(), action, source };
        std::fs::create_dir_all(&workload.run).map_err(io("create its run directory"))?;
        let shim_log =
            File::options().create(true).append(true).open(workload.shim_log()).map_err(io("open its shim log"))?;
        let (ready_read, ready_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io("make a pipe")(e.into()))?;
        let ready_fd = ready_write.as_raw_fd();
        let mut command = Command::new(&self.settings.shim_binary);
        command
            .arg("--data-dir")
            .arg(&self.paths.data)
            .arg("--run-dir")
            .arg(&self.paths.run)
            .args(["shim", "--name", name, "--ready-fd", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(shim_log);
        // SAFETY: only dup2 and fcntl, both async-signal-safe, run between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if ready_fd == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(ready_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // The shim forks itself into its own session and its parent exits at
        // once: reaping it here leaves no zombie and ties the shim to nothing.
        let status = command.status().map_err(io("start its shim"))?;
        drop(ready_write);
        if !status.success() {
            return Err(RuntimeError::StartFailed {
                name: name.to_string(),
                reason: format!("the shim exited with {status}; see {}", workload.shim_log().display()),
            });
        }
        let mut answer = String::new();
        File::from(ready_read).read_to_string(&mut answer).map_err(io("hear from its shim"))?;
        let answer = answer.trim();
        if let Some(pid) = answer.strip_prefix("ok ") {
            return pid.parse().map_err(|_| RuntimeError::StartFailed {
                name: name.to_string(),
                reason: format!("the shim answered {answer:?}"),
            });
        }
        let reason = match answer.strip_prefix("error ") {
            Some(reason) => reason.to_string(),
            None => {
                format!("the shim stopped before it could start the container; see {}", workload.shim_log().display())
            }
        };
        Err(RuntimeError::StartFailed { name: name.to_string(), reason })
    }

    /// Stops the workload (SIGTERM, its grace period, SIGKILL) and waits for its shim to finish.
    pub fn stop(&self, name: &str) -> Result<WorkloadInfo, RuntimeError> {
        require_root()?;
        let workload = self.paths.workload(name);
        if !workload.record().exists() {
            return Err(RuntimeError::NotFound(name.to_string()));
        }
        // An unreadable record (from another version, or damaged) must still be stoppable.
        let grace = WorkloadRecord::read(&workload.record())
            .map(|r| r.spec.stop_grace_period)
            .unwrap_or(Duration::from_secs(10));
        let deadline = Instant::now() + grace + Duration::from_secs(10);
        if let Ok(status) = WorkloadStatus::read(&workload.status()) {
            if status.shim_alive() {
                let _ = kill(Pid::from_raw(status.shim_pid), Signal::SIGTERM);
                // The shim publishes its final state, then exits: wait for both.
                while Instant::now() < deadline && status.shim_alive() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        self.info(name)
    }

    /// Stops the workload and deletes all it had but its named volumes.
    pub fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        self.stop(name)?;
        let workload = self.paths.workload(name);
        let io = |action: &'static str| move |source| RuntimeError::Io { name: name.to_string(), action, source };
        super::shim::remove_leftover_container(&self.paths, name);
        rootfs::unmount(&workload.rootfs()).map_err(io("unmount its rootfs"))?;
        remove_dir(&workload.run).map_err(io("remove its run directory"))?;
        remove_dir(&workload.dir).map_err(io("remove its directory"))
    }

    pub fn info(&self, name: &str) -> Result<WorkloadInfo, RuntimeError> {
        let workload = self.paths.workload(name);
        if !workload.record().exists() {
            return Err(RuntimeError::NotFound(name.to_string()));
        }
        let status = WorkloadStatus::read(&workload.status()).ok();
        let record = match WorkloadRecord::read(&workload.record()) {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!("workload record {}: {e}", workload.record().display());
                return Ok(WorkloadInfo {
                    instance: name.to_string(),
                    name: name.to_string(),
                    deployment: None,
                    spec_hash: String::new(),
                    image: String::new(),
                    image_digest: String::new(),
                    state: "unreadable".to_string(),
                    status,
                });
            }
        };
        let state = match &status {
            None => "created".to_string(),
            Some(s) if !s.state.is_final() && !s.shim_alive() => "lost".to_string(),
            Some(s) if s.crash_loop && s.state != State::Stopped => "crash-loop".to_string(),
            Some(s) => {
                serde_json::to_value(s.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
            }
        };
        Ok(WorkloadInfo {
            instance: name.to_string(),
            name: record.spec.name,
            deployment: record.deployment,
            spec_hash: record.spec_hash,
            image: record.image,
            image_digest: record.image_digest,
            state,
            status,
        })
    }

    /// Every workload instance on the device, by instance id.
    pub fn list(&self) -> Vec<WorkloadInfo> {
        let mut names: Vec<String> = std::fs::read_dir(self.paths.workloads())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names.iter().filter_map(|n| self.info(n).ok()).collect()
    }
}

fn remove_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

pub fn require_root() -> Result<(), RuntimeError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(RuntimeError::NotRoot)
    }
}

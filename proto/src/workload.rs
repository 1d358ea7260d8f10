//! The workload spec: what one container on a device should be.
//!
//! Operators write it as TOML (or JSON); the agent turns it into an OCI runtime
//! spec. Unknown fields are refused so that a misspelt limit is an error, not a
//! limit silently dropped. The field reference is docs/workload-spec.md.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::size::ByteSize;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Unique on the device: `[a-z0-9][a-z0-9_.-]{0,62}`.
    pub name: String,
    /// `registry/repo:tag`, `registry/repo@sha256:...`, or a name imported from an archive.
    pub image: String,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Added to (and overriding) the image's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Numeric `uid` or `uid:gid`; defaults to the image's user, else root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Host devices passed through (serial ports, GPIO, I2C).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only_rootfs: bool,
    /// All capabilities, every device, no seccomp filter. Off unless asked for.
    #[serde(default, skip_serializing_if = "is_false")]
    pub privileged: bool,
    /// Capabilities added to the default set, e.g. `NET_BIND_SERVICE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthProbe>,
    /// Time between SIGTERM and SIGKILL when the workload is stopped.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub stop_grace_period: Duration,
    /// How a change of this workload is rolled out on the device.
    #[serde(default)]
    pub update_strategy: UpdateStrategy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateStrategy {
    /// Stop the old container, then start the new one: never two at once.
    #[default]
    StopFirst,
    /// Start the new one and wait until it is up (healthy, when it has a
    /// probe) before stopping the old one: no gap in service.
    StartFirst,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Mount {
    /// Absolute host path to bind. Exactly one of `source` and `volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// A named volume kept by the agent across updates of the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Absolute path inside the container.
    pub target: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Device {
    /// Host device node, e.g. `/dev/ttyUSB0` or `/dev/gpiochip0`.
    pub path: PathBuf,
    /// Path inside the container; the host path if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// Its own network namespace with only loopback.
    #[default]
    None,
    /// The device's network stack.
    Host,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Resources {
    /// Hard memory limit, e.g. `"64MiB"`. Past it the kernel OOM-kills the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// CPU quota in cores, e.g. `0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(default)]
    pub mode: RestartMode,
    /// First delay before a restart; doubled after each quick exit.
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A run at least this long counts as a success: the backoff starts over.
    #[serde(default = "default_min_uptime", with = "humantime_serde")]
    pub min_uptime: Duration,
    /// Quick exits in a row after which the workload is reported as crash-looping.
    #[serde(default = "default_crash_loop_threshold")]
    pub crash_loop_threshold: u32,
}

fn default_backoff_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(300)
}
fn default_min_uptime() -> Duration {
    Duration::from_secs(10)
}
fn default_crash_loop_threshold() -> u32 {
    5
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            mode: RestartMode::default(),
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
            min_uptime: default_min_uptime(),
            crash_loop_threshold: default_crash_loop_threshold(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthProbe {
    #[serde(flatten)]
    pub check: HealthCheck,
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Failures in a row that make the workload unhealthy.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Failures during this time after a start do not count.
    #[serde(default, with = "humantime_serde")]
    pub start_period: Duration,
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_failure_threshold() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthCheck {
    /// Run a command inside the container; exit 0 is healthy.
    Exec(Vec<String>),
    /// Connect to this TCP port on the device.
    Tcp(u16),
    /// GET this URL path on the device; a 2xx or 3xx answer is healthy.
    Http(HttpCheck),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HttpCheck {
    pub port: u16,
    #[serde(default = "default_http_path")]
    pub path: String,
}

fn default_http_path() -> String {
    "/".to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot parse the workload spec: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("cannot parse the workload spec: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid workload spec `{name}`: {problem}")]
    Invalid { name: String, problem: String },
}

impl WorkloadSpec {
    /// Parses TOML, or JSON when the text starts with `{`, then validates.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let spec: Self =
            if text.trim_start().starts_with('{') { serde_json::from_str(text)? } else { toml::from_str(text)? };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what serde cannot: names, paths, and combinations that cannot work.
    pub fn validate(&self) -> Result<(), SpecError> {
        let fail = |problem: String| Err(SpecError::Invalid { name: self.name.clone(), problem });
        if !valid_name(&self.name) {
            return fail(
                "the name must be 1 to 63 characters of a-z, 0-9, `_`, `.` or `-`, starting with a letter or digit"
                    .into(),
            );
        }
        if self.image.trim().is_empty() {
            return fail("`image` is empty".into());
        }
        if let Some(command) = &self.command {
            if command.is_empty() {
                return fail("`command` is an empty list; leave it out to use the image's entrypoint".into());
            }
        }
        if let Some(user) = &self.user {
            if parse_user(user).is_none() {
                return fail(format!("`user` is {user:?}: use a numeric uid or uid:gid"));
            }
        }
        if let Some(dir) = &self.working_dir {
            if !dir.starts_with('/') {
                return fail(format!("`working-dir` {dir:?} must be an absolute path"));
            }
        }
        for (i, mount) in self.mounts.iter().enumerate() {
            if !mount.target.starts_with('/') {
                return fail(format!("mount {i}: target {:?} must be an absolute path", mount.target));
            }
            match (&mount.source, &mount.volume) {
                (Some(source), None) if !source.is_absolute() => {
                    return fail(format!("mount {i}: source {source:?} must be an absolute host path"));
                }
                (Some(_), None) => {}
                (None, Some(volume)) if !valid_name(volume) => {
                    return fail(format!("mount {i}: volume name {volume:?} is not valid"));
                }
                (None, Some(_)) => {}
                _ => return fail(format!("mount {i}: set exactly one of `source` and `volume`")),
            }
        }
        for device in &self.devices {
            if !device.path.starts_with("/dev/") {
                return fail(format!("device {:?} is not under /dev", device.path));
            }
        }
        if let Some(cpus) = self.resources.cpus {
            if !(cpus > 0.0 && cpus.is_finite()) {
                return fail(format!("`resources.cpus` is {cpus}: give a positive number of cores"));
            }
        }
        if self.resources.pids == Some(0) {
            return fail("`resources.pids` is 0: no process could start".into());
        }
        if let Some(memory) = self.resources.memory {
            if memory.0 < 4 << 20 {
                return fail(format!("`resources.memory` is {memory}: below 4MiB no workload can start"));
            }
        }
        let policy = &self.restart;
        if policy.backoff_initial.is_zero() || policy.backoff_max < policy.backoff_initial {
            return fail("`restart.backoff-initial` must be above zero and at most `restart.backoff-max`".into());
        }
        if let Some(probe) = &self.health {
            if probe.interval.is_zero() || probe.timeout.is_zero() || probe.failure_threshold == 0 {
                return fail("health probe interval, timeout and failure-threshold must be above zero".into());
            }
            match &probe.check {
                HealthCheck::Exec(cmd) if cmd.is_empty() => return fail("the exec health probe has no command".into()),
                HealthCheck::Tcp(_) | HealthCheck::Http(_) if self.network == Network::None => {
                    return fail("tcp and http health probes reach the workload on the device's network: set `network = \"host\"` or use an exec probe".into());
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The capabilities every workload has, before `capabilities` adds to them:
/// Podman's default set, what ordinary images expect (chown, setuid to drop
/// root, bind low ports), without NET_RAW, MKNOD or AUDIT_WRITE.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// A capability as the kernel names it: `net_admin`, `NET_ADMIN` and
/// `CAP_NET_ADMIN` are all `CAP_NET_ADMIN`.
pub fn capability_name(name: &str) -> String {
    format!("CAP_{}", name.trim_start_matches("CAP_").to_ascii_uppercase())
}

/// Manifest media types asked of registries, by the agent when it pulls and
/// by the hub when it pins a tag to a digest: a registry serves a manifest
/// according to what is accepted, so both must ask alike for the digest the
/// hub pins to be the one the agent gets.
pub const ACCEPTED_MANIFESTS: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Names of workloads and volumes become directory names and container ids.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(b))
}

/// `"1000"` or `"1000:1000"`; the gid defaults to the uid.
pub fn parse_user(user: &str) -> Option<(u32, u32)> {
    match user.split_once(':') {
        Some((uid, gid)) => Some((uid.parse().ok()?, gid.parse().ok()?)),
        None => {
            let uid = user.parse().ok()?;
            Some((uid, uid))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "sensor-reader"
image = "registry.local/sensor:1.2"
command = ["/bin/reader"]
args = ["--port", "/dev/ttyUSB0"]
env = { LOG = "debug" }
working-dir = "/app"
user = "1000:20"
network = "host"
read-only-rootfs = true
capabilities = ["NET_BIND_SERVICE"]
stop-grace-period = "3s"
devices = [{ path = "/dev/ttyUSB0" }]
mounts = [
  { source = "/etc/site", target = "/etc/site", read-only = true },
  { volume = "readings", target = "/data" },
]
[resources]
memory = "64MiB"
cpus = 0.5
pids = 32
[restart]
mode = "on-failure"
backoff-initial = "200ms"
backoff-max = "30s"
[health]
http = { port = 8080, path = "/healthz" }
interval = "5s"
start-period = "20s"
"#;

    #[test]
    fn full_spec_parses_with_every_field() {
        let spec = WorkloadSpec::parse(FULL).unwrap();
        assert_eq!(spec.resources.memory, Some(ByteSize(64 << 20)));
        assert_eq!(spec.restart.mode, RestartMode::OnFailure);
        assert_eq!(spec.restart.backoff_initial, Duration::from_millis(200));
        assert_eq!(spec.restart.crash_loop_threshold, 5);
        assert_eq!(spec.stop_grace_period, Duration::from_secs(3));
        let health = spec.health.unwrap();
        assert_eq!(health.check, HealthCheck::Http(HttpCheck { port: 8080, path: "/healthz".into() }));
        assert_eq!(health.timeout, Duration::from_secs(2));
        assert_eq!(spec.mounts[1].volume.as_deref(), Some("readings"));
    }

    #[test]
    fn minimal_spec_gets_safe_defaults() {
        let spec = WorkloadSpec::parse("name = \"a\"\nimage = \"busybox\"\n").unwrap();
        assert_eq!(spec.network, Network::None);
        assert!(!spec.privileged);
        assert_eq!(spec.restart.mode, RestartMode::Always);
        assert_eq!(spec.stop_grace_period, Duration::from_secs(10));
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = WorkloadSpec::parse(FULL).unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(WorkloadSpec::parse(&json).unwrap(), spec);
    }

    #[test]
    fn misspelt_field_is_refused_not_ignored() {
        let err =
            WorkloadSpec::parse("name = \"a\"\nimage = \"b\"\n[resources]\nmemroy = \"1G\"\n").unwrap_err().to_string();
        assert!(err.contains("memroy"), "{err}");
    }

    fn invalid(extra: &str) -> String {
        WorkloadSpec::parse(&format!("name = \"w\"\nimage = \"b\"\n{extra}")).unwrap_err().to_string()
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        assert!(invalid("user = \"nobody\"").contains("numeric uid"));
        assert!(invalid("working-dir = \"app\"").contains("absolute"));
        assert!(invalid("mounts = [{ target = \"/x\" }]").contains("exactly one"));
        assert!(invalid("mounts = [{ source = \"rel\", target = \"/x\" }]").contains("absolute host path"));
        assert!(invalid("devices = [{ path = \"/etc/passwd\" }]").contains("not under /dev"));
        assert!(invalid("command = []").contains("empty list"));
        assert!(invalid("[resources]\ncpus = 0").contains("positive"));
        assert!(invalid("[resources]\nmemory = \"1KiB\"").contains("4MiB"));
        assert!(invalid("[health]\ntcp = 80").contains("network = \"host\""));
        assert!(invalid("[restart]\nbackoff-initial = \"1m\"\nbackoff-max = \"1s\"").contains("backoff"));
        let bad_name = WorkloadSpec::parse("name = \"Bad Name\"\nimage = \"b\"\n").unwrap_err();
        assert!(bad_name.to_string().contains("1 to 63 characters"));
    }

    #[test]
    fn users_parse_as_uid_and_gid() {
        assert_eq!(parse_user("1000"), Some((1000, 1000)));
        assert_eq!(parse_user("1000:20"), Some((1000, 20)));
        assert_eq!(parse_user("root"), None);
    }
}

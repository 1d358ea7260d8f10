//! Admission policy: what the hub refuses to roll out, checked when an
//! operator applies a deployment. Secure unless the hub's configuration says
//! otherwise (`[policy]`); each refusal names the rule and the key that would
//! allow it.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use outpost_proto::workload::{capability_name, Network, WorkloadSpec, DEFAULT_CAPABILITIES};
use outpost_proto::DeploymentSpec;
use serde::Deserialize;

/// The `[policy]` table of the hub's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Policy {
    /// Privileged workloads: every capability, every device, no seccomp.
    pub allow_privileged: bool,
    /// Host directories a workload may bind (each with what is under it).
    /// Empty: no host mounts; named volumes are always allowed.
    pub allowed_host_paths: Vec<PathBuf>,
    /// Host devices passed through (`devices`).
    pub allow_devices: bool,
    /// `network = "host"`. Allowed by default: the only other network is
    /// loopback alone, so any workload that talks to anything (or has a tcp
    /// or http health probe) needs it.
    pub allow_host_network: bool,
    /// Capabilities a workload may add to the default set, e.g. `NET_ADMIN`.
    /// Those already in the default set are always allowed.
    pub allowed_capabilities: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_privileged: false,
            allowed_host_paths: Vec::new(),
            allow_devices: false,
            allow_host_network: true,
            allowed_capabilities: Vec::new(),
        }
    }
}

/// One rule one workload breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("workload {workload:?}: privileged containers are refused by the hub's policy (policy.allow-privileged)")]
    Privileged { workload: String },
    #[error(
        "workload {workload:?}: host mount {path:?} is outside the host paths the hub's policy allows \
         (policy.allowed-host-paths)"
    )]
    HostPath { workload: String, path: PathBuf },
    #[error("workload {workload:?}: host mount {path:?} is relative; the hub's policy admits absolute paths only")]
    RelativeHostPath { workload: String, path: PathBuf },
    #[error(
        "workload {workload:?}: passing device {path:?} through is refused by the hub's policy (policy.allow-devices)"
    )]
    Device { workload: String, path: PathBuf },
    #[error("workload {workload:?}: the host network is refused by the hub's policy (policy.allow-host-network)")]
    HostNetwork { workload: String },
    #[error(
        "workload {workload:?}: adding capability {capability} is refused by the hub's policy \
         (policy.allowed-capabilities)"
    )]
    Capability { workload: String, capability: String },
}

/// Every rule a deployment breaks (never none), so that one apply shows the
/// operator all there is to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Refusal(pub Vec<Violation>);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, violation) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{violation}")?;
        }
        Ok(())
    }
}

/// Admits `spec` if no workload of it breaks `policy`.
pub fn admit(policy: &Policy, spec: &DeploymentSpec) -> Result<(), Refusal> {
    let violations: Vec<Violation> = spec.workloads.iter().flat_map(|w| violations(policy, w)).collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Refusal(violations))
    }
}

fn violations(policy: &Policy, w: &WorkloadSpec) -> Vec<Violation> {
    let workload = || w.name.clone();
    let mut found = Vec::new();
    if w.privileged && !policy.allow_privileged {
        found.push(Violation::Privileged { workload: workload() });
    }
    for path in w.mounts.iter().filter_map(|m| m.source.as_ref()) {
        match normalize(path) {
            None => found.push(Violation::RelativeHostPath { workload: workload(), path: path.clone() }),
            Some(normal) if !host_path_allowed(policy, &normal) => {
                found.push(Violation::HostPath { workload: workload(), path: path.clone() })
            }
            Some(_) => {}
        }
    }
    if !policy.allow_devices {
        for device in &w.devices {
            found.push(Violation::Device { workload: workload(), path: device.path.clone() });
        }
    }
    if w.network == Network::Host && !policy.allow_host_network {
        found.push(Violation::HostNetwork { workload: workload() });
    }
    for capability in &w.capabilities {
        let name = capability_name(capability);
        let allowed = DEFAULT_CAPABILITIES.contains(&name.as_str())
            || policy.allowed_capabilities.iter().any(|a| capability_name(a) == name);
        if !allowed {
            found.push(Violation::Capability { workload: workload(), capability: capability.clone() });
        }
    }
    found
}

fn host_path_allowed(policy: &Policy, path: &Path) -> bool {
    policy.allowed_host_paths.iter().filter_map(|allowed| normalize(allowed)).any(|allowed| path.starts_with(allowed))
}

/// An absolute path with `.` and `..` resolved by their text (`/data/../etc`
/// is `/etc`); `None` for a relative one. Symbolic links on the device are
/// not seen from the hub: a link under an allowed path is the device's owner's.
fn normalize(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut normal = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => normal.push(part),
            Component::ParentDir => {
                normal.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deployment of one workload named "cam", with `extra` TOML lines.
    fn deployment(extra: &str) -> DeploymentSpec {
        toml::from_str(&format!("name = \"camera\"\n[[workloads]]\nname = \"cam\"\nimage = \"cam:1\"\n{extra}\n"))
            .unwrap()
    }

    fn refused(policy: &Policy, extra: &str) -> Vec<Violation> {
        admit(policy, &deployment(extra)).unwrap_err().0
    }

    #[test]
    fn a_plain_workload_with_volumes_and_the_host_network_is_admitted_by_default() {
        let spec = deployment(
            "network = \"host\"\ncapabilities = [\"net_bind_service\"]\nmounts = [{ volume = \"db\", target = \"/db\" }]",
        );
        assert_eq!(admit(&Policy::default(), &spec), Ok(()));
    }

    #[test]
    fn a_privileged_workload_is_refused_naming_the_workload_and_the_key_unless_allowed() {
        let refusal = admit(&Policy::default(), &deployment("privileged = true")).unwrap_err();
        assert_eq!(refusal.0, [Violation::Privileged { workload: "cam".into() }]);
        assert_eq!(
            refusal.to_string(),
            "workload \"cam\": privileged containers are refused by the hub's policy (policy.allow-privileged)"
        );
        let policy = Policy { allow_privileged: true, ..Policy::default() };
        assert_eq!(admit(&policy, &deployment("privileged = true")), Ok(()));
    }

    #[test]
    fn a_host_mount_is_admitted_only_under_an_allowed_path_after_normalization() {
        let mount = |source: &str| format!("mounts = [{{ source = \"{source}\", target = \"/x\" }}]");
        let none = Policy::default();
        assert!(matches!(&refused(&none, &mount("/data"))[..], [Violation::HostPath { .. }]));

        let policy = Policy { allowed_host_paths: vec!["/data".into(), "/srv/site/".into()], ..Policy::default() };
        for inside in ["/data", "/data/cam", "/data/./cam/../logs", "/srv/site/a"] {
            assert_eq!(admit(&policy, &deployment(&mount(inside))), Ok(()), "{inside}");
        }
        for outside in ["/data/../etc", "/data2", "/srv", "/", "/data/cam/../../etc/shadow"] {
            let found = refused(&policy, &mount(outside));
            assert_eq!(found, [Violation::HostPath { workload: "cam".into(), path: outside.into() }], "{outside}");
            assert!(found[0].to_string().contains("(policy.allowed-host-paths)"));
        }
    }

    #[test]
    fn a_relative_host_mount_is_refused_whatever_the_allowed_paths() {
        let policy = Policy { allowed_host_paths: vec!["/".into()], ..Policy::default() };
        let mut spec = deployment("mounts = [{ source = \"/data\", target = \"/x\" }]");
        spec.workloads[0].mounts[0].source = Some("data/../../etc".into());
        let found = admit(&policy, &spec).unwrap_err().0;
        assert_eq!(found, [Violation::RelativeHostPath { workload: "cam".into(), path: "data/../../etc".into() }]);
    }

    #[test]
    fn a_device_passed_through_is_refused_unless_devices_are_allowed() {
        let devices = "devices = [{ path = \"/dev/ttyUSB0\" }, { path = \"/dev/gpiochip0\" }]";
        let found = refused(&Policy::default(), devices);
        assert_eq!(
            found,
            [
                Violation::Device { workload: "cam".into(), path: "/dev/ttyUSB0".into() },
                Violation::Device { workload: "cam".into(), path: "/dev/gpiochip0".into() },
            ]
        );
        assert!(found[0].to_string().contains("(policy.allow-devices)"));
        assert_eq!(admit(&Policy { allow_devices: true, ..Policy::default() }, &deployment(devices)), Ok(()));
    }

    #[test]
    fn the_host_network_is_refused_only_when_the_policy_says_so() {
        let policy = Policy { allow_host_network: false, ..Policy::default() };
        let found = refused(&policy, "network = \"host\"");
        assert_eq!(found, [Violation::HostNetwork { workload: "cam".into() }]);
        assert!(found[0].to_string().contains("(policy.allow-host-network)"));
        assert_eq!(admit(&policy, &deployment("")), Ok(()));
    }

    #[test]
    fn a_capability_beyond_the_default_set_is_refused_unless_listed_in_any_spelling() {
        let found = refused(&Policy::default(), "capabilities = [\"NET_ADMIN\", \"CHOWN\", \"cap_sys_time\"]");
        assert_eq!(
            found,
            [
                Violation::Capability { workload: "cam".into(), capability: "NET_ADMIN".into() },
                Violation::Capability { workload: "cam".into(), capability: "cap_sys_time".into() },
            ]
        );
        assert!(found[0].to_string().contains("(policy.allowed-capabilities)"));
        let policy =
            Policy { allowed_capabilities: vec!["net_admin".into(), "CAP_SYS_TIME".into()], ..Policy::default() };
        assert_eq!(admit(&policy, &deployment("capabilities = [\"NET_ADMIN\", \"SYS_TIME\"]")), Ok(()));
    }

    #[test]
    fn every_rule_every_workload_breaks_is_reported_at_once() {
        let mut spec = deployment("privileged = true\ndevices = [{ path = \"/dev/ttyUSB0\" }]");
        let mut other = spec.workloads[0].clone();
        other.name = "logger".into();
        other.privileged = true;
        other.devices.clear();
        spec.workloads.push(other);
        let refusal = admit(&Policy::default(), &spec).unwrap_err();
        assert_eq!(
            refusal.0,
            [
                Violation::Privileged { workload: "cam".into() },
                Violation::Device { workload: "cam".into(), path: "/dev/ttyUSB0".into() },
                Violation::Privileged { workload: "logger".into() },
            ]
        );
        let message = refusal.to_string();
        assert!(message.contains("\"cam\": privileged") && message.contains("; workload \"logger\""), "{message}");
    }

    #[test]
    fn a_policy_table_parses_in_kebab_case_and_refuses_unknown_keys() {
        let policy: Policy =
            toml::from_str("allow-privileged = true\nallowed-host-paths = [\"/data\"]\nallow-host-network = false\n")
                .unwrap();
        assert!(policy.allow_privileged && !policy.allow_host_network && !policy.allow_devices);
        assert_eq!(policy.allowed_host_paths, [PathBuf::from("/data")]);
        let err = toml::from_str::<Policy>("allow-privilege = true\n").unwrap_err().to_string();
        assert!(err.contains("allow-privilege"), "{err}");
    }
}

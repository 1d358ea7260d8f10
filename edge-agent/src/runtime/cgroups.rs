//! What the kernel's cgroups can enforce here, and what they saw happen.
//!
//! Raspberry Pi OS boots with the memory controller off: a limit that cannot
//! be enforced is refused with the fix, never silently dropped.

use std::path::{Path, PathBuf};

use outpost_proto::WorkloadSpec;

#[derive(Debug, thiserror::Error)]
#[error("workload `{workload}` sets {limit}, but this kernel's `{controller}` cgroup controller is disabled{hint}; enable it and reboot, or remove the limit from the spec")]
pub struct MissingController {
    pub workload: String,
    pub limit: &'static str,
    pub controller: &'static str,
    hint: &'static str,
}

/// Checks every limit of `spec` against the controllers listed in /proc/cgroups.
pub fn check_limits(spec: &WorkloadSpec, proc_cgroups: &str) -> Result<(), MissingController> {
    let enabled = |name: &str| {
        proc_cgroups.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() == 4 && fields[0] == name && fields[3] == "1"
        })
    };
    let wanted = [
        (
            spec.resources.memory.is_some(),
            "resources.memory",
            "memory",
            " (on a Raspberry Pi add `cgroup_enable=memory cgroup_memory=1` to cmdline.txt)",
        ),
        (spec.resources.cpus.is_some(), "resources.cpus", "cpu", ""),
        (spec.resources.pids.is_some(), "resources.pids", "pids", ""),
    ];
    for (set, limit, controller, hint) in wanted {
        if set && !enabled(controller) {
            return Err(MissingController { workload: spec.name.clone(), limit, controller, hint });
        }
    }
    Ok(())
}

pub fn check_limits_on_this_kernel(spec: &WorkloadSpec) -> Result<(), MissingController> {
    let proc_cgroups = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
    check_limits(spec, &proc_cgroups)
}

/// The kernel's count of OOM kills in a container's cgroup (v1 or v2), read
/// before the cgroup is deleted so that an exit by SIGKILL can be told apart.
pub fn oom_kills(cgroups_path: &str) -> u64 {
    let relative = cgroups_path.trim_start_matches('/');
    let candidates: [(PathBuf, &str); 3] = [
        (Path::new("/sys/fs/cgroup/memory").join(relative).join("memory.oom_control"), "oom_kill "),
        (Path::new("/sys/fs/cgroup").join(relative).join("memory.events"), "oom_kill "),
        (Path::new("/sys/fs/cgroup/unified").join(relative).join("memory.events"), "oom_kill "),
    ];
    candidates
        .iter()
        .filter_map(|(path, key)| std::fs::read_to_string(path).ok().map(|text| counter(&text, key)))
        .max()
        .unwrap_or(0)
}

fn counter(text: &str, key: &str) -> u64 {
    text.lines().find_map(|line| line.strip_prefix(key)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /proc/cgroups of a Raspberry Pi 4 booted without cgroup_enable=memory.
    const PI_DEFAULT: &str = "#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t0\t51\t1
cpu\t0\t51\t1
cpuacct\t0\t51\t1
blkio\t0\t51\t1
memory\t0\t51\t0
devices\t0\t51\t1
freezer\t0\t51\t1
pids\t0\t51\t1
";

    fn spec(resources: &str) -> WorkloadSpec {
        WorkloadSpec::parse(&format!("name = \"cam\"\nimage = \"x\"\n[resources]\n{resources}")).unwrap()
    }

    #[test]
    fn memory_limit_on_a_pi_without_memory_cgroup_is_refused_with_the_fix() {
        let err = check_limits(&spec("memory = \"64MiB\""), PI_DEFAULT).unwrap_err().to_string();
        assert!(err.contains("resources.memory") && err.contains("cgroup_enable=memory"), "{err}");
    }

    #[test]
    fn limits_whose_controllers_are_enabled_pass() {
        check_limits(&spec("cpus = 0.5\npids = 10"), PI_DEFAULT).unwrap();
        check_limits(&spec(""), PI_DEFAULT).unwrap();
    }

    #[test]
    fn oom_counter_is_read_from_v1_and_v2_files() {
        assert_eq!(counter("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill "), 2);
        assert_eq!(counter("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n", "oom_kill "), 1);
        assert_eq!(counter("", "oom_kill "), 0);
    }
}

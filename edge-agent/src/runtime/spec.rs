//! Workload spec + image config -> OCI runtime spec (config.json).
//!
//! The spec is written as the JSON that runc and youki read, so it can be
//! compared line by line with theirs, then parsed into oci-spec's types, which
//! checks it. Secure unless asked: a small capability set, no new privileges,
//! seccomp on, /proc and /sys masked and read-only, devices denied but the
//! standard ones and those the workload names.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Capability, Spec};
use outpost_proto::workload::{capability_name, parse_user, Network, WorkloadSpec, DEFAULT_CAPABILITIES};
use serde_json::{json, Value};

use super::image::ImageConfig;

/// Syscalls a workload never needs and an attacker wants: kernel modules,
/// kexec, reboot, swap, clock, keyring, BPF, tracing other processes, and
/// namespace games. Refused with EPERM; everything else is allowed, which keeps
/// the filter valid on every architecture a Raspberry Pi runs.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the generator needs to know about the device and the agent's layout.
pub struct SpecContext<'a> {
    pub rootfs: &'a Path,
    pub volumes: &'a Path,
    /// cgroup path relative to each controller's root, e.g. `/outpost/web`.
    pub cgroups_path: String,
    pub host: &'a dyn Host,
}

/// The parts of the host the generator looks at, behind a trait so that tests
/// can describe a device that has a serial port, or lacks one.
pub trait Host {
    fn device(&self, path: &Path) -> io::Result<DeviceNode>;
    fn exists(&self, path: &Path) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceNode {
    pub char_device: bool,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

pub struct LinuxHost;

impl Host for LinuxHost {
    fn device(&self, path: &Path) -> io::Result<DeviceNode> {
        let meta = std::fs::metadata(path)?;
        let file_type = meta.file_type();
        if !file_type.is_char_device() && !file_type.is_block_device() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a device node"));
        }
        let rdev = meta.rdev();
        Ok(DeviceNode {
            char_device: file_type.is_char_device(),
            major: nix::sys::stat::major(rdev),
            minor: nix::sys::stat::minor(rdev),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecGenError {
    #[error("workload `{0}`: neither the spec nor the image gives a command: set `command`")]
    NoCommand(String),
    #[error("workload `{workload}`: the image runs as user {user:?}, a name; set `user` to a numeric uid[:gid]")]
    NamedUser { workload: String, user: String },
    #[error("workload `{workload}`: unknown capability {name:?} (use kernel names such as NET_ADMIN)")]
    UnknownCapability { workload: String, name: String },
    #[error("workload `{workload}`: device {path:?} cannot be passed through: {reason}")]
    Device { workload: String, path: PathBuf, reason: String },
    #[error("workload `{workload}`: mount source {path:?} does not exist on this device")]
    MissingMountSource { workload: String, path: PathBuf },
    #[error("generated an invalid OCI spec: {0}")]
    Invalid(#[from] serde_json::Error),
}

pub fn generate(w: &WorkloadSpec, image: &ImageConfig, ctx: &SpecContext) -> Result<Spec, SpecGenError> {
    let spec = json!({
        "ociVersion": "1.0.2",
        "hostname": w.name,
        "root": { "path": ctx.rootfs, "readonly": w.read_only_rootfs },
        "process": process(w, image)?,
        "mounts": mounts(w, ctx)?,
        "linux": linux(w, ctx)?,
    });
    Ok(serde_json::from_value(spec)?)
}

/// Docker's rules: a spec `command` replaces the entrypoint and drops the
/// image's cmd; `args` replaces the cmd.
pub fn argv(w: &WorkloadSpec, image: &ImageConfig) -> Vec<String> {
    match &w.command {
        Some(command) => command.iter().chain(w.args.iter().flatten()).cloned().collect(),
        None => {
            let args = w.args.as_ref().unwrap_or(&image.cmd);
            image.entrypoint.iter().chain(args).cloned().collect()
        }
    }
}

fn process(w: &WorkloadSpec, image: &ImageConfig) -> Result<Value, SpecGenError> {
    let args = argv(w, image);
    if args.is_empty() {
        return Err(SpecGenError::NoCommand(w.name.clone()));
    }
    let (uid, gid) = match w.user.as_deref().or(image.user.as_deref()).filter(|u| !u.is_empty()) {
        None => (0, 0),
        Some(user) => parse_user(user)
            .ok_or_else(|| SpecGenError::NamedUser { workload: w.name.clone(), user: user.to_string() })?,
    };
    let caps = capabilities(w)?;
    let cwd = w.working_dir.as_deref().or(image.working_dir.as_deref()).filter(|d| !d.is_empty()).unwrap_or("/");
    Ok(json!({
        "terminal": false,
        "user": { "uid": uid, "gid": gid },
        "args": args,
        "env": env(w, image),
        "cwd": cwd,
        "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
        "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
        "noNewPrivileges": !w.privileged,
    }))
}

/// The image's environment, then the spec's on top, by variable name.
fn env(w: &WorkloadSpec, image: &ImageConfig) -> Vec<String> {
    let mut vars: BTreeMap<&str, &str> = BTreeMap::new();
    vars.insert("PATH", &DEFAULT_PATH[5..]);
    for entry in &image.env {
        if let Some((key, value)) = entry.split_once('=') {
            vars.insert(key, value);
        }
    }
    for (key, value) in &w.env {
        vars.insert(key, value);
    }
    vars.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn capabilities(w: &WorkloadSpec) -> Result<Vec<String>, SpecGenError> {
    if w.privileged {
        return Ok(all_capabilities());
    }
    let mut caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    for name in &w.capabilities {
        let full = capability_name(name);
        if serde_json::from_value::<Capability>(Value::String(full.clone())).is_err() {
            return Err(SpecGenError::UnknownCapability { workload: w.name.clone(), name: name.clone() });
        }
        if !caps.contains(&full) {
            caps.push(full);
        }
    }
    Ok(caps)
}

/// Every capability Linux numbers, 0 (CHOWN) to 40 (CHECKPOINT_RESTORE).
fn all_capabilities() -> Vec<String> {
    const NAMES: &[&str] = &[
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    NAMES.iter().map(|n| format!("CAP_{n}")).collect()
}

fn mounts(w: &WorkloadSpec, ctx: &SpecContext) -> Result<Vec<Value>, SpecGenError> {
    let mut mounts = vec![
        json!({ "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] }),
        json!({ "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] }),
        json!({ "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] }),
        json!({ "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] }),
        json!({ "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] }),
        json!({ "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] }),
    ];
    if w.network == Network::Host {
        for file in ["/etc/resolv.conf", "/etc/hosts"] {
            if ctx.host.exists(Path::new(file)) {
                mounts.push(bind(Path::new(file), file, true));
            }
        }
    }
    for m in &w.mounts {
        let source = match (&m.source, &m.volume) {
            (Some(source), _) => {
                if !ctx.host.exists(source) {
                    return Err(SpecGenError::MissingMountSource { workload: w.name.clone(), path: source.clone() });
                }
                source.clone()
            }
            (None, Some(volume)) => ctx.volumes.join(volume),
            (None, None) => unreachable!("validated: every mount has a source or a volume"),
        };
        mounts.push(bind(&source, &m.target, m.read_only));
    }
    Ok(mounts)
}

fn bind(source: &Path, target: &str, read_only: bool) -> Value {
    let mut options = vec!["rbind", "nosuid", "nodev"];
    if read_only {
        options.push("ro");
    }
    json!({ "destination": target, "type": "bind", "source": source, "options": options })
}

fn linux(w: &WorkloadSpec, ctx: &SpecContext) -> Result<Value, SpecGenError> {
    let mut namespaces =
        vec![json!({"type": "pid"}), json!({"type": "ipc"}), json!({"type": "uts"}), json!({"type": "mount"})];
    if w.network == Network::None {
        namespaces.push(json!({"type": "network"}));
    }

    let mut device_rules = vec![json!({ "allow": false, "access": "rwm" })];
    let mut devices = Vec::new();
    if w.privileged {
        device_rules = vec![json!({ "allow": true, "access": "rwm" })];
    } else {
        // null, zero, full, random, urandom, tty, ptmx and the pts: what every program may open.
        for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)] {
            device_rules.push(json!({ "allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm" }));
        }
        device_rules.push(json!({ "allow": true, "type": "c", "major": 136, "access": "rwm" }));
    }
    for device in &w.devices {
        let node = ctx.host.device(&device.path).map_err(|e| SpecGenError::Device {
            workload: w.name.clone(),
            path: device.path.clone(),
            reason: if e.kind() == io::ErrorKind::NotFound {
                "it does not exist on this device (is the hardware attached and its driver loaded?)".into()
            } else {
                e.to_string()
            },
        })?;
        let typ = if node.char_device { "c" } else { "b" };
        let target = device.target.clone().unwrap_or_else(|| device.path.display().to_string());
        devices.push(json!({
            "path": target, "type": typ, "major": node.major, "minor": node.minor,
            "fileMode": node.mode, "uid": node.uid, "gid": node.gid,
        }));
        device_rules
            .push(json!({ "allow": true, "type": typ, "major": node.major, "minor": node.minor, "access": "rwm" }));
    }

    let mut resources = json!({ "devices": device_rules });
    if let Some(memory) = w.resources.memory {
        // Swap equal to the limit: a workload past its limit is killed, not swapped.
        resources["memory"] = json!({ "limit": memory.0, "swap": memory.0 });
    }
    if let Some(cpus) = w.resources.cpus {
        let period: u64 = 100_000;
        resources["cpu"] = json!({ "quota": (cpus * period as f64).round() as i64, "period": period });
    }
    if let Some(pids) = w.resources.pids {
        resources["pids"] = json!({ "limit": pids });
    }

    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": ctx.cgroups_path,
        "resources": resources,
        "devices": devices,
    });
    if !w.privileged {
        linux["maskedPaths"] = json!([
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
            "/sys/devices/virtual/powercap",
        ]);
        linux["readonlyPaths"] = json!(["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",]);
        linux["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM }],
        });
    }
    Ok(linux)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxNamespaceType;

    struct FakeHost {
        devices: Vec<(PathBuf, DeviceNode)>,
        paths: Vec<PathBuf>,
    }

    impl Host for FakeHost {
        fn device(&self, path: &Path) -> io::Result<DeviceNode> {
            self.devices
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, n)| *n)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn exists(&self, path: &Path) -> bool {
            self.paths.iter().any(|p| p == path)
        }
    }

    fn host() -> FakeHost {
        FakeHost {
            devices: vec![(
                PathBuf::from("/dev/ttyUSB0"),
                DeviceNode { char_device: true, major: 188, minor: 0, mode: 0o660, uid: 0, gid: 20 },
            )],
            paths: vec![PathBuf::from("/etc/site"), PathBuf::from("/etc/resolv.conf")],
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/app/bin:/bin".into(), "MODE=image".into()],
            working_dir: Some("/app".into()),
            user: Some("100".into()),
        }
    }

    fn gen(toml_extra: &str) -> Result<Spec, SpecGenError> {
        let w = WorkloadSpec::parse(&format!("name = \"web\"\nimage = \"x\"\n{toml_extra}")).unwrap();
        let host = host();
        let ctx = SpecContext {
            rootfs: Path::new("/data/web/rootfs"),
            volumes: Path::new("/data/volumes"),
            cgroups_path: "/outpost/web".into(),
            host: &host,
        };
        generate(&w, &image(), &ctx)
    }

    #[test]
    fn image_entrypoint_cmd_env_user_and_workdir_are_used_when_the_spec_is_silent() {
        let spec = gen("").unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_ref().unwrap(), &["/bin/app", "--serve"]);
        assert_eq!(process.cwd(), Path::new("/app"));
        assert_eq!(process.user().uid(), 100);
        assert!(process.env().as_ref().unwrap().contains(&"PATH=/app/bin:/bin".to_string()));
        assert!(!process.terminal().unwrap());
        assert!(process.no_new_privileges().unwrap());
    }

    #[test]
    fn spec_command_replaces_entrypoint_and_drops_image_cmd() {
        let spec = gen("command = [\"/bin/sh\"]\nenv = { MODE = \"spec\" }\nuser = \"0\"").unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_ref().unwrap(), &["/bin/sh"]);
        assert!(process.env().as_ref().unwrap().contains(&"MODE=spec".to_string()));
        assert_eq!(process.user().uid(), 0);
    }

    #[test]
    fn spec_args_replace_image_cmd_but_keep_entrypoint() {
        let w = WorkloadSpec::parse("name = \"a\"\nimage = \"x\"\nargs = [\"--once\"]").unwrap();
        assert_eq!(argv(&w, &image()), ["/bin/app", "--once"]);
    }

    #[test]
    fn limits_become_cgroup_resources() {
        let spec = gen("[resources]\nmemory = \"64MiB\"\ncpus = 0.25\npids = 20").unwrap();
        let resources = spec.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(resources.memory().unwrap().limit(), Some(64 << 20));
        assert_eq!(resources.memory().unwrap().swap(), Some(64 << 20));
        assert_eq!(resources.cpu().as_ref().unwrap().quota(), Some(25_000));
        assert_eq!(resources.pids().unwrap().limit(), 20);
    }

    #[test]
    fn default_container_is_isolated_with_seccomp_and_few_capabilities() {
        let spec = gen("").unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let namespaces: Vec<_> = linux.namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect();
        assert!(namespaces.contains(&LinuxNamespaceType::Network));
        assert!(namespaces.contains(&LinuxNamespaceType::Pid));
        assert!(linux.seccomp().is_some());
        assert!(linux.masked_paths().as_ref().unwrap().contains(&"/proc/kcore".to_string()));
        let caps = spec.process().as_ref().unwrap().capabilities().as_ref().unwrap();
        let bounding = caps.bounding().as_ref().unwrap();
        assert!(!bounding.contains(&Capability::SysAdmin));
        assert!(!bounding.contains(&Capability::NetRaw));
        assert!(bounding.contains(&Capability::Chown));
    }

    #[test]
    fn privileged_workload_gets_all_capabilities_and_devices_without_seccomp() {
        let spec = gen("privileged = true").unwrap();
        let caps = spec.process().as_ref().unwrap().capabilities().as_ref().unwrap();
        assert!(caps.bounding().as_ref().unwrap().contains(&Capability::SysAdmin));
        assert_eq!(caps.bounding().as_ref().unwrap().len(), 41);
        assert!(spec.linux().as_ref().unwrap().seccomp().is_none());
    }

    #[test]
    fn host_network_shares_the_device_stack_and_its_resolver() {
        let spec = gen("network = \"host\"").unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert!(!linux.namespaces().as_ref().unwrap().iter().any(|n| n.typ() == LinuxNamespaceType::Network));
        let mounts = spec.mounts().as_ref().unwrap();
        assert!(mounts.iter().any(|m| m.destination() == Path::new("/etc/resolv.conf")));
        assert!(!mounts.iter().any(|m| m.destination() == Path::new("/etc/hosts")));
    }

    #[test]
    fn passed_device_is_created_and_allowed_in_the_device_cgroup() {
        let spec = gen("devices = [{ path = \"/dev/ttyUSB0\" }]").unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let device = &linux.devices().as_ref().unwrap()[0];
        assert_eq!((device.major(), device.minor()), (188, 0));
        let rules = linux.resources().as_ref().unwrap().devices().as_ref().unwrap();
        assert!(rules.iter().any(|r| r.allow() && r.major() == Some(188)));
        assert!(!rules[0].allow(), "the first rule denies every other device");
    }

    #[test]
    fn missing_device_or_mount_source_is_a_clear_error() {
        let err = gen("devices = [{ path = \"/dev/ttyACM3\" }]").unwrap_err().to_string();
        assert!(err.contains("/dev/ttyACM3") && err.contains("does not exist"), "{err}");
        let err = gen("mounts = [{ source = \"/srv/missing\", target = \"/m\" }]").unwrap_err().to_string();
        assert!(err.contains("/srv/missing"), "{err}");
    }

    #[test]
    fn volumes_and_host_paths_become_bind_mounts() {
        let spec = gen("mounts = [{ volume = \"db\", target = \"/db\" }, { source = \"/etc/site\", target = \"/site\", read-only = true }]").unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        let db = mounts.iter().find(|m| m.destination() == Path::new("/db")).unwrap();
        assert_eq!(db.source().as_deref(), Some(Path::new("/data/volumes/db")));
        let site = mounts.iter().find(|m| m.destination() == Path::new("/site")).unwrap();
        assert!(site.options().as_ref().unwrap().contains(&"ro".to_string()));
    }

    #[test]
    fn unknown_capability_and_named_user_are_refused() {
        assert!(matches!(gen("capabilities = [\"FLY\"]"), Err(SpecGenError::UnknownCapability { .. })));
        let spec = gen("capabilities = [\"net_admin\"]").unwrap();
        let caps = spec.process().as_ref().unwrap().capabilities().as_ref().unwrap();
        assert!(caps.effective().as_ref().unwrap().contains(&Capability::NetAdmin));
    }

    #[test]
    fn image_user_given_by_name_is_refused_with_the_fix() {
        let w = WorkloadSpec::parse("name = \"a\"\nimage = \"x\"").unwrap();
        let image = ImageConfig { user: Some("nobody".into()), ..image() };
        let host = host();
        let ctx =
            SpecContext { rootfs: Path::new("/r"), volumes: Path::new("/v"), cgroups_path: "/o/a".into(), host: &host };
        let err = generate(&w, &image, &ctx).unwrap_err().to_string();
        assert!(err.contains("numeric uid"), "{err}");
    }
}

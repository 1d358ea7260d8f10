//! A cgroup the size of a small device (memory and a share of a CPU), for
//! running the agent as if on one. cgroup v1 (a memory and a cpu hierarchy)
//! or v2 (the unified one), whichever the machine has.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Constrained {
    /// The memory cgroup, and the cpu one (the same directory on v2).
    memory: PathBuf,
    cpu: PathBuf,
    v2: bool,
}

impl Constrained {
    /// Makes cgroup `name` limited to `memory_bytes` and `cpus` of one CPU
    /// (0.25: a quarter). Panics, saying why, when it cannot.
    pub fn new(name: &str, memory_bytes: u64, cpus: f64) -> Self {
        crate::agent::require_root();
        let root = Path::new("/sys/fs/cgroup");
        let v2 = !root.join("memory").is_dir();
        let (memory, cpu) = if v2 {
            (root.join(name), root.join(name))
        } else {
            let cpu = if root.join("cpu").is_dir() { root.join("cpu") } else { root.join("cpu,cpuacct") };
            (root.join("memory").join(name), cpu.join(name))
        };
        for dir in [&memory, &cpu] {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot make cgroup {}: {e}", dir.display()));
        }
        let period = 100_000u64;
        let quota = (cpus * period as f64) as u64;
        let set = |dir: &Path, file: &str, value: String| {
            std::fs::write(dir.join(file), &value)
                .unwrap_or_else(|e| panic!("cannot set {file} = {value} in {}: {e}", dir.display()))
        };
        if v2 {
            set(&memory, "memory.max", memory_bytes.to_string());
            set(&memory, "memory.swap.max", "0".into());
            set(&cpu, "cpu.max", format!("{quota} {period}"));
        } else {
            set(&memory, "memory.limit_in_bytes", memory_bytes.to_string());
            // Without swap accounting the file is absent; swap is then not limited.
            let _ = std::fs::write(memory.join("memory.memsw.limit_in_bytes"), memory_bytes.to_string());
            set(&cpu, "cpu.cfs_period_us", period.to_string());
            set(&cpu, "cpu.cfs_quota_us", quota.to_string());
        }
        Self { memory, cpu, v2 }
    }

    /// `command`, run inside the cgroup from its first instruction (a shell
    /// moves itself in, then execs it: the pid stays the command's).
    pub fn wrap(&self, command: &Command) -> Command {
        let mut procs = vec![self.memory.join("cgroup.procs")];
        if self.cpu != self.memory {
            procs.push(self.cpu.join("cgroup.procs"));
        }
        let enter: String = procs.iter().map(|p| format!("echo $$ > {} && ", p.display())).collect();
        let mut wrapped = Command::new("sh");
        wrapped.arg("-c").arg(format!("{enter}exec \"$@\"")).arg("sh").arg(command.get_program());
        wrapped.args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        wrapped
    }

    /// How many times the kernel's OOM killer killed a process in the cgroup.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 { ("memory.events", "oom_kill") } else { ("memory.oom_control", "oom_kill") };
        let text = std::fs::read_to_string(self.memory.join(file)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {key} in {}: the kernel does not count OOM kills", file))
    }

    /// The cgroup's peak memory use (bytes), page cache included.
    pub fn peak_bytes(&self) -> u64 {
        let file = if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
        std::fs::read_to_string(self.memory.join(file)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        let text = std::fs::read_to_string(self.memory.join("cgroup.procs")).unwrap_or_default();
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

impl Drop for Constrained {
    /// Kills what is left in it, then removes it.
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: kill(2) has no memory preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let _ = std::fs::remove_dir(&self.memory);
        let _ = std::fs::remove_dir(&self.cpu);
    }
}

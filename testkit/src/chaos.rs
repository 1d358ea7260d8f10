//! Faults for the chaos hw-test (hw-tests/tests/chaos.rs): a seeded random
//! schedule, links between network namespaces that are cut, stalled or
//! slowed, a device clock that jumps, a disk that fills up.
//!
//! - A **cut** is `ip link set DEV down` on one end of a veth: the other side
//!   sees the carrier go, the route goes with it, sends fail at once.
//! - A **stall** drops every packet of the link silently (an nftables table
//!   in the namespace of the link's far end, input and output): the link
//!   stays up and nothing tells either side, as a WAN that blackholes.
//!   (netem's delay and loss would be the usual tool, but this kernel has no
//!   `sch_netem`; nftables is there.)
//! - A **slow** link: a token bucket (`tc qdisc tbf`) of a few kbit/s on both
//!   ends, queueing up to seconds before it drops.
//! - A **clock jump**: the agent runs under libfaketime (Debian's `faketime`)
//!   with a timestamp file the test rewrites; only the wall clock
//!   (`CLOCK_REALTIME`) moves, as NTP or an RTC-less boot moves it; the
//!   monotonic clock, which never jumps on a real device, is left alone. The
//!   host's clock is never touched.
//! - A **full disk**: a file that takes every free block of a small
//!   loop-mounted filesystem (`crate::loopfs`), removed later.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::netns::{Netns, Veth};

/// xorshift64*: small, and the same schedule from the same seed everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's one fixed point.
        Self(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi);
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A duration in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.between(lo, hi))
    }

    /// An index into `weights`, each chosen in proportion to its weight.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut pick = self.between(0, total - 1);
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                return i;
            }
            pick -= w;
        }
        unreachable!()
    }
}

/// The run's seed: `OUTPOST_CHAOS_SEED`, or a fresh one.
pub fn seed_from_env() -> u64 {
    match std::env::var("OUTPOST_CHAOS_SEED") {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| panic!("OUTPOST_CHAOS_SEED={text:?} is not a number")),
        Err(_) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let mut rng = Rng::new(now.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32));
            rng.next_u64() % 1_000_000_000
        }
    }
}

/// How long the faults go on: `OUTPOST_CHAOS_SECONDS`, or `default`.
pub fn duration_from_env(default: Duration) -> Duration {
    match std::env::var("OUTPOST_CHAOS_SECONDS") {
        Ok(text) => Duration::from_secs(
            text.trim().parse().unwrap_or_else(|_| panic!("OUTPOST_CHAOS_SECONDS={text:?} is not a number")),
        ),
        Err(_) => default,
    }
}

fn run(program: &str, args: &[&str], package: &str) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): apt-get install {package}"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn must(program: &str, args: &[&str], package: &str) {
    run(program, args, package).unwrap_or_else(|e| panic!("{e}"));
}

/// Panics, saying what to install, unless nftables and tbf work in a
/// throw-away namespace: the faults must not quietly do nothing.
pub fn require_tools() {
    crate::agent::require_root();
    let ns = Netns::new(&format!("op-chk-{}", std::process::id() % 100_000));
    let table = "add table inet chaos_check\n\
                 add chain inet chaos_check c { type filter hook input priority 0; }\n\
                 add rule inet chaos_check c iifname \"lo\" drop\n";
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(table.as_bytes())?;
            child.wait_with_output()
        })
        .expect("cannot run nft (apt-get install nftables)");
    assert!(out.status.success(), "nftables does not work here: {}", String::from_utf8_lossy(&out.stderr));
    must(
        "tc",
        &[
            "-n", &ns.name, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "8kbit", "burst", "1600", "latency",
            "1s",
        ],
        "iproute2 (and a kernel with sch_tbf)",
    );
    assert!(
        Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} is missing: apt-get install faketime (scripts/deps.sh installs it)"
    );
}

/// A veth link whose far end (`b`) is in a namespace of the test's own.
pub struct Link {
    /// What the schedule calls it: `wan`, `pi-1`...
    pub name: String,
    a: String,
    a_ns: Option<String>,
    b: String,
    b_ns: String,
    veth: Veth,
}

impl Link {
    pub fn new(name: &str, a: &str, a_ns: Option<&Netns>, a_ip: &str, b: &str, b_ns: &Netns, b_ip: &str) -> Self {
        let veth = Veth::new(a, a_ns, a_ip, b, b_ns, b_ip);
        Self {
            name: name.to_string(),
            a: a.to_string(),
            a_ns: a_ns.map(|n| n.name.clone()),
            b: b.to_string(),
            b_ns: b_ns.name.clone(),
            veth,
        }
    }

    /// `ip link set A down`, or up.
    pub fn cut(&self, cut: bool) {
        self.veth.set_up(!cut);
    }

    /// Every packet through the far end dropped, or let through again.
    pub fn stall(&self, stall: bool) {
        let table = format!("chaos_{}", self.b);
        let _ = run("ip", &["netns", "exec", &self.b_ns, "nft", "delete", "table", "inet", &table], "nftables");
        if stall {
            let b = &self.b;
            let rules = format!(
                "add table inet {table}\n\
                 add chain inet {table} in {{ type filter hook input priority -10; }}\n\
                 add chain inet {table} out {{ type filter hook output priority -10; }}\n\
                 add rule inet {table} in iifname \"{b}\" drop\n\
                 add rule inet {table} out oifname \"{b}\" drop\n"
            );
            let file = std::env::temp_dir().join(format!("outpost-chaos-{}-{table}.nft", std::process::id()));
            std::fs::write(&file, rules).unwrap();
            must("ip", &["netns", "exec", &self.b_ns, "nft", "-f", file.to_str().unwrap()], "nftables");
            let _ = std::fs::remove_file(file);
        }
    }

    /// A link of a few kbit/s, queueing up to seconds, or back to full speed.
    pub fn slow(&self, slow: bool) {
        for (ns, dev) in [(self.a_ns.as_deref(), self.a.as_str()), (Some(self.b_ns.as_str()), self.b.as_str())] {
            let mut args: Vec<&str> = Vec::new();
            if let Some(ns) = ns {
                args.extend(["-n", ns]);
            }
            let mut del = args.clone();
            del.extend(["qdisc", "del", "dev", dev, "root"]);
            let _ = run("tc", &del, "iproute2");
            if slow {
                args.extend([
                    "qdisc", "add", "dev", dev, "root", "tbf", "rate", "16kbit", "burst", "3000", "latency", "3s",
                ]);
                must("tc", &args, "iproute2");
            }
        }
    }

    /// Up, unblocked, full speed.
    pub fn heal(&self) {
        self.stall(false);
        self.slow(false);
        self.cut(false);
    }
}

/// Debian's libfaketime, the thread-safe build.
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// A wall clock of its own for the processes started through `binary()`:
/// a wrapper script that runs `real` under libfaketime, reading the offset
/// from a file that `jump` rewrites (re-read at most every second).
pub struct FakeClock {
    dir: tempfile::TempDir,
    binary: &'static Path,
}

impl FakeClock {
    pub fn wrapping(real: &Path) -> Self {
        assert!(Path::new(FAKETIME_LIB).exists(), "{FAKETIME_LIB} is missing: apt-get install faketime");
        let dir = tempfile::Builder::new().prefix("outpost-clock-").tempdir().expect("temp dir");
        let offset = dir.path().join("offset");
        std::fs::write(&offset, "+0\n").unwrap();
        let script = dir.path().join("edge-agent");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nLD_PRELOAD={FAKETIME_LIB} FAKETIME_TIMESTAMP_FILE={offset:?} FAKETIME_CACHE_DURATION=1 \
                 FAKETIME_DONT_FAKE_MONOTONIC=1 exec {real:?} \"$@\"\n"
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The agent driver keeps a &'static Path; one small leak per test.
        let binary: &'static Path = Box::leak(script.into_boxed_path());
        Self { dir, binary }
    }

    /// The wrapper, to give `Agent::with_binary`.
    pub fn binary(&self) -> &'static Path {
        self.binary
    }

    /// From now on the wall clock is `seconds` off the host's (either way).
    pub fn jump(&self, seconds: i64) {
        let offset = self.dir.path().join("offset");
        let tmp = self.dir.path().join("offset.new");
        std::fs::write(&tmp, format!("{seconds:+}\n")).unwrap();
        std::fs::rename(tmp, offset).unwrap();
    }
}

/// Files that take every free block of the filesystem at `dir`.
pub struct DiskFiller {
    dir: PathBuf,
}

impl DiskFiller {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.join("chaos-fill") }
    }

    /// Writes until the filesystem says ENOSPC; returns the bytes taken.
    /// One large file first, then small ones until not even a byte fits:
    /// ext4 still takes small delayed-allocation writes after a large one
    /// fails, and a disk full for the test must be full for the agent.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir).expect("the fill directory");
        let mut file = std::fs::File::create(self.dir.join("large")).expect("the fill file");
        let mut taken = 0u64;
        for chunk in [1 << 20, 4096] {
            let block = vec![0u8; chunk];
            while file.write_all(&block).is_ok() {
                taken += chunk as u64;
            }
        }
        let _ = file.sync_all();
        let mut n = 0;
        for size in [4096, 1] {
            loop {
                let block = vec![0u8; size];
                let path = self.dir.join(format!("small-{n}"));
                match std::fs::write(&path, &block) {
                    Ok(()) => taken += size as u64,
                    Err(_) => break,
                }
                n += 1;
            }
        }
        taken
    }

    pub fn free(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..100).map(|_| a.between(0, 9)).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.between(0, 9)).collect();
        assert_eq!(xs, ys);
        assert!((0..10).all(|v| xs.contains(&v)), "every value comes up: {xs:?}");
        let mut zero = Rng::new(0);
        assert_ne!(zero.next_u64(), zero.next_u64());
    }
}

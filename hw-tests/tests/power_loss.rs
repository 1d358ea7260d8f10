//! Power loss on a device: the agent's data dir (its sled store, the
//! desired-state snapshot, images, workloads, logs) lives on a small ext4
//! filesystem on a loop device, and the power is cut while the agent is
//! storing new desired states as fast as they come.
//!
//! How the cut models a power loss (see `testkit::loopfs`): the agent is
//! SIGKILLed, then the filesystem is shut down with `EXT4_IOC_SHUTDOWN`
//! (`NOLOGFLUSH`), which drops every write that had not been flushed (the
//! page cache, delayed allocations, the open journal transaction) and stops
//! every later one. Then the rest of the device dies (shims, containers, the
//! run dir, which is a tmpfs on a device, and the cgroups), the filesystem is
//! unmounted, checked with `e2fsck -fy` (the journal replayed) and mounted
//! again, and the agent starts from what is on disk, with no network. Killing
//! the agent alone would not do: the kernel would still write out everything
//! the agent wrote, flushed or not. There is no device-mapper on this kernel,
//! so no dm-flakey; the shutdown drops the same writes dm-flakey's
//! `drop_writes` would, but not writes a disk's volatile cache would lose.
//!
//! A full disk on the same filesystem: the agent stops, its workload runs on,
//! and started again with room it takes what it could not store.
//!
//! A hub's store on the same kind of filesystem keeps every change it
//! answered through cuts too.
//!
//! "Acknowledged" is what `edge-agent apply` reported as applied: the agent
//! answers only after the state and its `applied` event are flushed.
//! Needs root, a kernel with loop devices and ext4, e2fsprogs and util-linux.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;
use testkit::agent::{state, Agent};
use testkit::chaos::DiskFiller;
use testkit::hub::Hub;
use testkit::loopfs::LoopFs;

const WAIT: Duration = Duration::from_secs(20);
/// When the power goes, counted from the first of a stream of new desired
/// states: one cut per entry, in this order, on the same filesystem.
const CUTS: [Duration; 8] = [
    Duration::from_millis(0),
    Duration::from_millis(15),
    Duration::from_millis(40),
    Duration::from_millis(80),
    Duration::from_millis(130),
    Duration::from_millis(200),
    Duration::from_millis(300),
    Duration::from_millis(550),
];

/// Generation `g` runs `sleep 600000+g`, so a running process says which generation started it.
fn seconds(generation: u64) -> u64 {
    600_000 + generation
}

fn document(generation: u64) -> String {
    let image = testkit::image::busybox_pinned();
    let seconds = seconds(generation);
    format!(
        "version = 1\ngeneration = {generation}\n\n[[deployments]]\nname = \"app\"\nrevision = {generation}\n\n\
         [[deployments.workloads]]\nname = \"svc\"\nimage = \"{image}\"\n\
         command = [\"/bin/sh\", \"-c\", \"exec sleep {seconds}\"]\nstop-grace-period = \"100ms\"\n"
    )
}

/// A device: an agent whose data dir is on a loop-mounted ext4 filesystem,
/// and whose configuration is elsewhere (as /etc is on a device).
struct Device {
    agent: Agent,
    fs: LoopFs,
    etc: TempDir,
    /// Between `power_off` and `power_on`.
    off: AtomicBool,
}

impl Device {
    fn new() -> Self {
        let fs = LoopFs::new(128);
        let mut agent = Agent::new();
        agent.data =
            tempfile::Builder::new().prefix("outpost-data-").tempdir_in(fs.path()).expect("data dir on the loop fs");
        let etc = tempfile::Builder::new().prefix("outpost-etc-").tempdir().expect("temp dir");
        // No hub: the device has no network at all.
        let config = etc.path().join("agent.toml");
        std::fs::write(&config, format!("trust-root = {:?}\n", testkit::trust::operator().root_path())).unwrap();
        agent.extra_args = vec!["--config".into(), config.to_str().unwrap().into()];
        testkit::import_busybox(&agent);
        Self { agent, fs, etc, off: AtomicBool::new(false) }
    }

    /// `edge-agent apply` of generation `g`, signed; Ok when the agent acknowledged it.
    fn apply(&self, generation: u64) -> Result<(), String> {
        let file = self.etc.path().join(format!("desired-{generation}.toml"));
        std::fs::write(&file, testkit::trust::operator().sign_document(&document(generation))).unwrap();
        let out = self.agent.command().args(["apply", "-f", file.to_str().unwrap()]).output().unwrap();
        match out.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    /// Pids of every process of this device but the daemon: shims (the
    /// agent's binary with this data dir on its command line), containers
    /// (in this agent's cgroups), an `apply` still running.
    fn processes(&self) -> Vec<i32> {
        let data = self.fs.path().to_string_lossy().into_owned();
        let me = std::process::id() as i32;
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            if pid == me {
                continue;
            }
            let read = |file: &str| std::fs::read(entry.path().join(file)).unwrap_or_default();
            let stat = String::from_utf8_lossy(&read("stat")).into_owned();
            if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) {
                continue;
            }
            let cmdline = String::from_utf8_lossy(&read("cmdline")).replace('\0', " ");
            let cgroup = String::from_utf8_lossy(&read("cgroup")).into_owned();
            if cmdline.contains(&data) || cgroup.contains(&self.agent.cgroup_parent) {
                pids.push(pid);
            }
        }
        pids
    }

    /// SIGKILL to every process of the device until none is left.
    fn kill_everything(&self) {
        self.agent.kill_daemon();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.processes();
            if pids.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "processes of the device survive SIGKILL: {pids:?}");
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The power goes: the agent dies first, so it cannot act on the errors
    /// the shutdown gives it; at once nothing unflushed survives; then
    /// everything else of the device goes, as it would with the power.
    fn power_off(&self, cutting: &AtomicBool) {
        cutting.store(true, Ordering::SeqCst);
        self.agent.kill_daemon();
        self.fs.power_cut();
        self.off.store(true, Ordering::SeqCst);
        self.kill_everything();
    }

    /// What a reboot finds gone, then the filesystem checked and mounted, and
    /// the agent started on it. Returns fsck's output and where this boot's
    /// lines start in the daemon's log.
    fn power_on(&mut self) -> (String, usize) {
        self.fs.unmount();
        for entry in std::fs::read_dir(self.agent.run.path()).unwrap().flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
        remove_cgroups(&self.agent.cgroup_parent);
        let fsck = self.fs.fsck();
        self.fs.mount();
        self.off.store(false, Ordering::SeqCst);
        let log_start = self.agent.daemon_log().len();
        self.agent.start_daemon();
        (fsck, log_start)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // The agent's own clean-up (ps, rm) needs the filesystem; a device left powered off has none.
        self.kill_everything();
        if self.off.load(Ordering::SeqCst) {
            remove_cgroups(&self.agent.cgroup_parent);
        }
    }
}

/// Removes `parent` and the cgroups below it in every hierarchy, deepest first.
fn remove_cgroups(parent: &str) {
    fn remove(dir: &std::path::Path) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove(&entry.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        let dir = hierarchy.path().join(parent);
        if dir.is_dir() {
            remove(&dir);
        }
    }
}

/// What the device runs once it settled: one instance of `svc`, running;
/// its deployment revision (= generation) and its process's command line.
fn settled(agent: &Agent, at_least: u64) -> (u64, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let list: Value = serde_json::from_str(&agent.ok(&["ps", "--json"])).expect("ps --json is JSON");
        let list = list.as_array().cloned().unwrap_or_default();
        if let [w] = list.as_slice() {
            let revision = w["deployment"]["revision"].as_u64().unwrap_or(0);
            let pid = w["status"]["pid"].as_i64().unwrap_or(0);
            if state(w) == "running" && w["name"] == "svc" && revision >= at_least && pid > 0 {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains("sleep") {
                    return (revision, cmdline.trim().to_string());
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the device never settled on one running `svc` of generation {at_least} or newer: {list:#?}\n{}",
            agent.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agent_started_after_a_power_cut_mid_write_runs_the_last_state_it_acknowledged() {
    let started = Instant::now();
    let mut device = Device::new();
    device.agent.start_daemon();
    device.apply(1).expect("generation 1 is acknowledged");
    settled(&device.agent, 1);

    let mut acknowledged: Vec<u64> = vec![1];
    let mut sent = 1;
    // Cuts that came while an apply was on its way: sent, not (yet) acknowledged.
    let mut mid_apply = 0;
    for (cut, after) in CUTS.iter().enumerate() {
        // New desired states, one after the other, as fast as the agent acknowledges them.
        let cutting = AtomicBool::new(false);
        let stream_acks = Mutex::new(Vec::new());
        let next = Mutex::new(sent + 1);
        let errors = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            let device = &device;
            scope.spawn(|| {
                while !cutting.load(Ordering::SeqCst) {
                    let generation = {
                        let mut next = next.lock().unwrap();
                        *next += 1;
                        *next - 1
                    };
                    match device.apply(generation) {
                        Ok(()) => stream_acks.lock().unwrap().push(generation),
                        // Failing for any reason but the cut is a bug.
                        Err(e) if !cutting.load(Ordering::SeqCst) => {
                            errors.lock().unwrap().push(format!("generation {generation}: {e}"))
                        }
                        Err(_) => {}
                    }
                }
            });
            std::thread::sleep(*after);
            device.power_off(&cutting);
        });
        let errors = errors.into_inner().unwrap();
        assert!(errors.is_empty(), "applies refused before the cut: {errors:#?}");
        let stream_acks = stream_acks.into_inner().unwrap();
        sent = next.into_inner().unwrap() - 1;
        acknowledged.extend(&stream_acks);
        let newest_acknowledged = *acknowledged.iter().max().unwrap();
        mid_apply += usize::from(sent > newest_acknowledged);

        let (fsck, log_start) = device.power_on();
        let data = device.agent.data.path().to_path_buf();
        let moved: Vec<String> = std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("store.corrupt"))
            .collect();
        assert!(
            moved.is_empty(),
            "cut {cut}: the store was found corrupt after a power cut and moved aside ({moved:?}):\n{}",
            device.agent.daemon_log()
        );

        let (running, cmdline) = settled(&device.agent, newest_acknowledged);
        println!(
            "cut {cut} after {after:?}: {} acknowledged in the stream, newest {newest_acknowledged}, sent up to {sent}; \
             runs generation {running} ({cmdline})",
            stream_acks.len()
        );
        assert!(running <= sent, "cut {cut}: the device runs generation {running}, which was never sent");
        assert_eq!(
            cmdline,
            format!("sleep {}", seconds(running)),
            "cut {cut}: generation {running}'s workload runs another generation's command"
        );

        // Every acknowledged generation's event survived, numbered once.
        let events = device.agent.events();
        let applied: Vec<u64> =
            events.iter().filter(|e| e["event"] == "applied").filter_map(|e| e["generation"].as_u64()).collect();
        for generation in &acknowledged {
            assert!(
                applied.contains(generation),
                "cut {cut}: the `applied` event of acknowledged generation {generation} is lost: {applied:?}"
            );
        }
        let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "cut {cut}: event numbers repeat or go back: {seqs:?}");
        assert!(
            applied.iter().all(|g| *g <= running),
            "cut {cut}: the device runs {running} though it recorded applying {applied:?}"
        );
        // sled writes its `conf` (the log's segment size) without an fsync;
        // the agent syncs it when it opens the store, so no cut empties it.
        let log = device.agent.daemon_log();
        let boot = log.get(log_start..).unwrap_or(&log);
        let corrupt: Vec<&str> = boot.lines().filter(|l| l.contains("corrupt")).collect();
        assert!(corrupt.is_empty(), "cut {cut}: the agent reported its store corrupt: {corrupt:#?}\nfsck:\n{fsck}");
    }

    assert!(mid_apply > 0, "no cut came while an apply was on its way: the test did not test a cut mid-write");

    // Still a working device: it takes the next generation.
    sent += 1;
    device.apply(sent).unwrap_or_else(|e| panic!("generation {sent} after the last power cut: {e}"));
    let (running, _) = settled(&device.agent, sent);
    assert_eq!(running, sent);
    println!("{} power cuts ({mid_apply} while an apply was on its way) in {:?}", CUTS.len(), started.elapsed());
}

/// A full disk: sled refuses every write after its first I/O error, also
/// once the disk has room again, so the agent stops (its service manager
/// starts it again) and its workload runs on meanwhile; it does not open its
/// store on the full disk (sled could damage it); started with room, it
/// takes the state it could not store before.
#[test]
fn an_agent_whose_disk_fills_stops_with_its_workload_running_and_started_with_room_takes_the_next_state() {
    let device = Device::new();
    device.agent.start_daemon();
    device.apply(1).expect("generation 1 is acknowledged");
    let (_, cmdline) = settled(&device.agent, 1);

    let filler = DiskFiller::new(device.fs.path());
    filler.fill();
    let refused = device.apply(2).expect_err("generation 2 was acknowledged on a full disk");
    println!("generation 2 on a full disk: {}", refused.trim());
    let exited = device.agent.wait_daemon_exit(WAIT);
    // Its log is on the full disk too: what it could write of it.
    let log = device.agent.daemon_log();
    assert!(exited.is_some(), "the agent runs on with a store that refuses every write:\n{log}");
    assert!(
        device.processes().iter().any(|pid| {
            let running = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&running).replace('\0', " ").trim() == cmdline
        }),
        "generation 1's workload ({cmdline}) stopped with the agent"
    );

    // Its service manager starts it again at once: on the full disk it does not open the store.
    let again = device.agent.command().arg("daemon").output().unwrap();
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && said.contains("KiB free"), "the agent started on a full disk: {said}");

    filler.free();
    device.agent.start_daemon();
    device.apply(2).unwrap_or_else(|e| panic!("generation 2 with room on the disk: {e}"));
    let log = device.agent.daemon_log();
    assert!(!log.contains("is corrupt"), "the store was found corrupt after the full disk:\n{log}");
    assert_eq!(settled(&device.agent, 2).0, 2);
    let applied: Vec<u64> = device
        .agent
        .events()
        .iter()
        .filter(|e| e["event"] == "applied")
        .filter_map(|e| e["generation"].as_u64())
        .collect();
    assert_eq!(applied, [1, 2], "each acknowledged generation's `applied` event, once");
}

/// The model itself: what was fsync'd before the cut is there after it,
/// what was only written is not, and nothing gets through after the cut.
#[test]
fn a_power_cut_keeps_what_was_flushed_and_drops_what_was_not() {
    use std::io::{Seek, Write};
    let mut fs = LoopFs::new(32);
    let flushed = fs.path().join("flushed");
    let mut file = std::fs::File::create(&flushed).unwrap();
    file.write_all(&[b'o'; 8192]).unwrap();
    file.sync_all().unwrap();
    std::fs::File::open(fs.path()).unwrap().sync_all().unwrap();
    // Overwritten in place, not flushed.
    file.rewind().unwrap();
    file.write_all(&[b'n'; 4096]).unwrap();
    let unflushed = fs.path().join("unflushed");
    std::fs::write(&unflushed, b"never flushed").unwrap();

    fs.power_cut();
    assert!(std::fs::write(fs.path().join("after"), b"x").is_err(), "a write after the cut succeeded");
    drop(file);
    fs.unmount();
    fs.fsck();
    fs.mount();

    assert_eq!(std::fs::read(&flushed).unwrap(), vec![b'o'; 8192], "the flushed content, not the unflushed overwrite");
    let lost = std::fs::read(&unflushed).map(|bytes| bytes.is_empty()).unwrap_or(true);
    assert!(lost, "data never flushed survived the cut: it does not model a power loss");
    assert!(!fs.path().join("after").exists());
}

/// When the power goes under the hub, counted from the first label of a run.
/// With sled's own sync alone, cuts after runs of seconds lost the labels
/// answered in the last few hundred milliseconds before them.
const HUB_CUTS: [Duration; 4] =
    [Duration::from_millis(40), Duration::from_millis(300), Duration::from_secs(3), Duration::from_secs(3)];

/// A hub whose store is on a loop-mounted ext4: labels set on a device one
/// after the other, as fast as the hub answers (it answers after its store
/// is flushed), with the power cut at each of `HUB_CUTS`. Every answered
/// label is there when the hub is back.
#[test]
fn a_hub_started_after_a_power_cut_keeps_every_change_it_acknowledged() {
    let mut fs = LoopFs::new(64);
    let hub = Hub::new_in(fs.path(), &[]);
    // Installed before the first cut: its configuration file is on the disk.
    nix::unistd::sync();
    let mut acknowledged: Vec<u64> = Vec::new();
    let mut next = 1;
    for (cut, after) in HUB_CUTS.iter().enumerate() {
        let cutting = AtomicBool::new(false);
        let answered = Mutex::new(Vec::new());
        let sent = Mutex::new(next);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !cutting.load(Ordering::SeqCst) {
                    let n = {
                        let mut sent = sent.lock().unwrap();
                        *sent += 1;
                        *sent - 1
                    };
                    let out = hub.cli(&["label", "rig-1", &format!("k{n}=v")]);
                    match out.status.success() {
                        true => answered.lock().unwrap().push(n),
                        false if !cutting.load(Ordering::SeqCst) => {
                            panic!("label {n} refused before the cut: {}", String::from_utf8_lossy(&out.stderr))
                        }
                        false => {}
                    }
                }
            });
            std::thread::sleep(*after);
            cutting.store(true, Ordering::SeqCst);
            hub.kill();
            fs.power_cut();
        });
        next = sent.into_inner().unwrap();
        acknowledged.extend(answered.into_inner().unwrap());
        fs.unmount();
        let fsck = fs.fsck();
        fs.mount();
        hub.start();

        let labels = match hub.try_get("/v1/devices/rig-1") {
            Ok(device) => device["labels"].clone(),
            // The device is made by its first label.
            Err(_) if acknowledged.is_empty() => Value::Null,
            Err(answer) => panic!("cut {cut}: the device is gone: {answer}"),
        };
        let lost: Vec<u64> = acknowledged.iter().copied().filter(|n| labels.get(format!("k{n}")).is_none()).collect();
        println!("cut {cut} after {after:?}: {} labels acknowledged, {} sent", acknowledged.len(), next - 1);
        assert!(lost.is_empty(), "cut {cut}: acknowledged labels lost: {lost:?}\nfsck:\n{fsck}\n{}", hub.log());
    }
    assert!(acknowledged.len() > CUTS.len(), "too few labels were set to test anything: {acknowledged:?}");
}

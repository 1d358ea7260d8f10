//! A small ext4 filesystem on a loop device, as a device's SD card, that a
//! test can cut the power to.
//!
//! `power_cut` shuts the filesystem down with `EXT4_IOC_SHUTDOWN` and
//! `EXT4_GOING_FLAGS_NOLOGFLUSH`: from that instant nothing more reaches the
//! disk. What was written but not yet fsync'd (dirty pages, delayed
//! allocations, the running journal transaction) is dropped, and every later
//! read or write fails with EIO. After an unmount and a journal replay (fsck,
//! or the next mount), the disk holds exactly what had been flushed before
//! the cut: what a power loss leaves. xfstests simulates crashes the same way
//! (`godown -f`). There is no device-mapper here (so no dm-flakey or
//! dm-log-writes), and a plain loop device keeps every write in the page
//! cache after a SIGKILL, which is why the shutdown is needed.
//!
//! What it does not model: a disk that reorders or loses writes it was
//! handed but not told to flush (a volatile write cache). The loop device
//! writes through to its backing file, so every block the kernel submitted
//! before the cut survives it.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// `_IOR('X', 125, __u32)`: ext4's (and XFS's) "going down" ioctl.
const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
/// Shut down at once: neither the data nor the journal is flushed first.
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 0x2;

fn run(program: &str, args: &[&str], package: &str) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): apt-get install {package}"))
}

fn must(program: &str, args: &[&str], package: &str) -> String {
    let out = run(program, args, package);
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An ext4 image attached to a loop device and mounted; detached and removed when dropped.
pub struct LoopFs {
    /// Holds the image and the mount point; removed after the drop unmounts.
    _dir: TempDir,
    device: String,
    mount_point: PathBuf,
    mounted: bool,
}

impl LoopFs {
    /// Makes an ext4 filesystem of `mib` MiB on a fresh loop device and mounts it.
    pub fn new(mib: u64) -> Self {
        crate::agent::require_root();
        let dir = tempfile::Builder::new().prefix("outpost-loopfs-").tempdir().expect("temp dir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .unwrap_or_else(|e| panic!("cannot make {}: {e}", image.display()));
        let image = image.to_str().expect("a UTF-8 path").to_string();
        must("mkfs.ext4", &["-q", "-F", &image], "e2fsprogs");
        let device = must("losetup", &["--find", "--show", &image], "util-linux (and a kernel with loop devices)");
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).expect("mount point");
        let mut fs = Self { _dir: dir, device, mount_point, mounted: false };
        fs.mount();
        fs
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// The power cut: nothing written from now on, nor anything not yet
    /// flushed, reaches the disk. Processes still using the filesystem get
    /// EIO; stop them and `unmount` before the next `mount`.
    pub fn power_cut(&self) {
        assert!(self.mounted, "power cut of {} while it is not mounted", self.device);
        let dir = std::fs::File::open(&self.mount_point).expect("open the mount point");
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 from a pointer that outlives the call.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_SHUTDOWN as _, &flags as *const u32) };
        assert_eq!(
            rc,
            0,
            "EXT4_IOC_SHUTDOWN on {}: {} (a kernel with ext4 4.10 or newer is needed)",
            self.mount_point.display(),
            std::io::Error::last_os_error()
        );
    }

    /// Unmounts what is mounted below the mount point (containers' rootfs),
    /// then the filesystem itself, retrying while it is busy. Panics, saying
    /// who holds it, when it stays busy.
    pub fn unmount(&mut self) {
        for below in self.mounts_below() {
            let _ = run("umount", &["-l", &below], "util-linux");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = run("umount", &[self.mount_point.to_str().unwrap()], "util-linux");
            if out.status.success() {
                self.mounted = false;
                return;
            }
            if Instant::now() > deadline {
                let holders = match Command::new("fuser").arg("-vm").arg(&self.mount_point).output() {
                    Ok(o) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
                    Err(e) => format!("(fuser from psmisc would say: {e})"),
                };
                panic!(
                    "cannot unmount {}: {}; holders: {holders}",
                    self.mount_point.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `e2fsck -fy`, as a device's boot does: replays the journal and fixes
    /// what ext4 does not journal (free counts). Panics when the filesystem
    /// had errors fsck could not correct. Returns fsck's output.
    pub fn fsck(&self) -> String {
        assert!(!self.mounted, "fsck of {} while it is mounted", self.device);
        let out = run("e2fsck", &["-fy", &self.device], "e2fsprogs");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // 0: clean; 1: errors corrected; 2: corrected, reboot; 4 and up: left uncorrected, or fsck failed.
        let code = out.status.code().unwrap_or(-1);
        assert!((0..4).contains(&code), "e2fsck -fy {} exited with {code}:\n{text}", self.device);
        text
    }

    pub fn mount(&mut self) {
        assert!(!self.mounted, "{} is already mounted", self.device);
        must("mount", &["-t", "ext4", &self.device, self.mount_point.to_str().unwrap()], "util-linux");
        self.mounted = true;
    }

    /// Mount points below the mount point, deepest first.
    fn mounts_below(&self) -> Vec<String> {
        let prefix = format!("{}/", self.mount_point.display());
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut below: Vec<String> = info
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| point.starts_with(&prefix))
            .map(String::from)
            .collect();
        below.sort_by_key(|point| std::cmp::Reverse(point.len()));
        below
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for below in self.mounts_below() {
            let _ = Command::new("umount").args(["-l", &below]).output();
        }
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mount_point).output();
            if std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .any(|line| line.split(' ').nth(4) == self.mount_point.to_str())
            {
                let _ = Command::new("umount").arg("-l").arg(&self.mount_point).output();
            }
        }
        // Detaches now, or (autoclear) as soon as a lazy unmount lets go of it.
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
    }
}

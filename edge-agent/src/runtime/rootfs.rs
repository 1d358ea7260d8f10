//! Each workload's root: its own writable layer over the image's shared,
//! read-only layers (overlayfs), so two workloads of one image share its disk.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Mounts the overlay at `target` unless it is already there (a shim
/// restarting a workload finds it mounted; after a reboot it is not).
pub fn mount_overlay(layers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    if is_mounted(target)? {
        return Ok(());
    }
    if layers.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the image has no layers"));
    }
    for dir in [upper, work, target] {
        std::fs::create_dir_all(dir)?;
    }
    // overlayfs lists the top layer first; images list the base first.
    let lower: Vec<String> = layers.iter().rev().map(|l| l.display().to_string()).collect();
    let options = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), upper.display(), work.display());
    if options.len() >= 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "overlay mount options exceed a page: the image has too many layers for this data directory path",
        ));
    }
    mount(Some("overlay"), target, Some("overlay"), MsFlags::empty(), Some(options.as_str()))
        .map_err(|e| io::Error::other(format!("cannot mount the overlay rootfs at {}: {e}", target.display())))
}

pub fn unmount(target: &Path) -> io::Result<()> {
    if !is_mounted(target)? {
        return Ok(());
    }
    umount2(target, MntFlags::MNT_DETACH).map_err(io::Error::from)
}

pub fn is_mounted(target: &Path) -> io::Result<bool> {
    let target = match target.canonicalize() {
        Ok(path) => path,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = mount_points(&mountinfo).any(|p| p == target);
    Ok(mounted)
}

/// Field 5 of each mountinfo line, with the kernel's octal escapes undone.
fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo.lines().filter_map(|line| line.split(' ').nth(4)).map(|p| {
        PathBuf::from(p.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_from_mountinfo_with_escapes_undone() {
        let info = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /var/lib/outpost/workloads/web/bundle/rootfs rw - overlay overlay rw\n";
        let points: Vec<PathBuf> = mount_points(info).collect();
        assert_eq!(points[0], Path::new("/mnt/with space"));
        assert_eq!(points[1], Path::new("/var/lib/outpost/workloads/web/bundle/rootfs"));
    }
}

//! A/B partitions on real block devices: two image files attached as loop
//! devices are the slots, the boot environment a text file beside them, and
//! the bootloader is simulated with `ota::boot`. Needs root and losetup.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use ota::{boot, confirm_boot, install_update, BootEnv, Digest, PartitionSlots, Slot, SlotBackend, SlotError};
use tempfile::TempDir;

const PARTITION: usize = 1 << 20;
const BOOTLIMIT: u32 = 2;

/// A loop device over an image file, detached when dropped.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(image: &Path) -> Self {
        testkit::agent::require_root();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .unwrap_or_else(|e| panic!("this test needs losetup (util-linux) to attach loop devices: {e}"));
        assert!(out.status.success(), "losetup -f --show {image:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Self { path: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()) }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Slot A holds the running system (`old`), slot B is empty, both loop devices.
struct Device {
    _dir: TempDir,
    devices: [LoopDevice; 2],
    slots: PartitionSlots,
    old: Vec<u8>,
}

impl Device {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let old: Vec<u8> = (0..PARTITION).map(|i| (i % 251) as u8).collect();
        fs::write(dir.path().join("a.img"), &old).unwrap();
        fs::write(dir.path().join("b.img"), vec![0u8; PARTITION]).unwrap();
        let devices = [LoopDevice::attach(&dir.path().join("a.img")), LoopDevice::attach(&dir.path().join("b.img"))];
        let slots = PartitionSlots::new(&devices[0].path, &devices[1].path, dir.path().join("fw_env"));
        slots.write_env(&BootEnv::new(Slot::A, BOOTLIMIT)).unwrap();
        Self { _dir: dir, devices, slots, old }
    }

    fn read_slot(&self, slot: Slot, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        fs::File::open(self.slots.slot_path(slot)).unwrap().read_exact(&mut bytes).unwrap();
        bytes
    }
}

fn install(slots: &PartitionSlots, image: &[u8]) -> Result<Slot, SlotError> {
    install_update(slots, &mut &image[..], image.len() as u64, &Digest::of(image))
}

#[test]
fn unconfirmed_update_on_a_loop_device_returns_to_the_old_slot_after_bootlimit_boots_with_its_bytes_intact() {
    let device = Device::new();
    assert!(device.devices[1].path.to_string_lossy().starts_with("/dev/loop"), "{:?}", device.devices[1].path);
    let new = vec![0x5a; PARTITION / 2];

    assert_eq!(install(&device.slots, &new).unwrap(), Slot::B);
    assert_eq!(device.read_slot(Slot::B, new.len()), new);
    for _ in 0..BOOTLIMIT {
        assert_eq!(boot(&device.slots).unwrap(), Slot::B);
    }
    assert_eq!(boot(&device.slots).unwrap(), Slot::A);
    assert_eq!(device.slots.env().unwrap(), BootEnv::new(Slot::A, BOOTLIMIT));
    assert_eq!(device.read_slot(Slot::A, PARTITION), device.old);
}

#[test]
fn confirmed_update_on_a_loop_device_stays_across_boots() {
    let device = Device::new();
    let new = vec![0xa5; PARTITION];

    install(&device.slots, &new).unwrap();
    assert_eq!(boot(&device.slots).unwrap(), Slot::B);
    assert_eq!(confirm_boot(&device.slots).unwrap(), BootEnv::new(Slot::B, BOOTLIMIT));
    for _ in 0..=BOOTLIMIT {
        assert_eq!(boot(&device.slots).unwrap(), Slot::B);
    }
    assert_eq!(device.read_slot(Slot::B, PARTITION), new);
    assert_eq!(device.read_slot(Slot::A, PARTITION), device.old);
}

#[test]
fn image_bigger_than_the_partition_is_refused_and_leaves_the_active_slot_and_env_untouched() {
    let device = Device::new();
    let image = vec![0x11; PARTITION + 4096];

    let err = install(&device.slots, &image).unwrap_err();

    assert!(matches!(err, SlotError::ImageTooBig { slot: Slot::B, .. }), "{err}");
    assert!(err.to_string().contains("holds 1048576"), "{err}");
    assert_eq!(device.slots.env().unwrap(), BootEnv::new(Slot::A, BOOTLIMIT));
    assert_eq!(device.read_slot(Slot::A, PARTITION), device.old);
    assert_eq!(boot(&device.slots).unwrap(), Slot::A);
}

/// An image source that breaks after `good` bytes, as a dying download or disk does.
struct Breaks {
    good: usize,
}

impl Read for Breaks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.good == 0 {
            return Err(io::Error::other("the image source failed"));
        }
        let n = buf.len().min(self.good);
        buf[..n].fill(0x33);
        self.good -= n;
        Ok(n)
    }
}

#[test]
fn write_failing_midway_leaves_the_active_slot_and_env_untouched_with_an_error_naming_the_device() {
    let device = Device::new();
    let length = PARTITION as u64;

    let err =
        install_update(&device.slots, &mut Breaks { good: PARTITION / 3 }, length, &Digest::of(b"x")).unwrap_err();

    assert!(matches!(err, SlotError::Io { action: "write", .. }), "{err}");
    assert!(err.to_string().contains(device.devices[1].path.to_str().unwrap()), "{err}");
    assert_eq!(device.slots.env().unwrap(), BootEnv::new(Slot::A, BOOTLIMIT));
    assert_eq!(device.read_slot(Slot::A, PARTITION), device.old);
    assert_eq!(boot(&device.slots).unwrap(), Slot::A);
}

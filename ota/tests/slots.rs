//! A/B updates against `FileSlots`: real image files in a temporary
//! directory, reboots simulated with `ota::boot`.

use std::fs;

use ota::{
    boot, confirm_boot, install_update, BootEnv, Digest, FileSlots, PartitionSlots, Slot, SlotBackend, SlotError,
};
use tempfile::TempDir;

const BOOTLIMIT: u32 = 3;
const OLD_IMAGE: &[u8] = b"system image 1.0";

/// A device running slot A with `OLD_IMAGE` in it and an empty slot B.
fn device() -> (TempDir, FileSlots) {
    let dir = tempfile::tempdir().unwrap();
    let slots = FileSlots::new(dir.path());
    fs::write(slots.slot_path(Slot::A), OLD_IMAGE).unwrap();
    fs::write(slots.slot_path(Slot::B), b"").unwrap();
    slots.write_env(&BootEnv::new(Slot::A, BOOTLIMIT)).unwrap();
    (dir, slots)
}

fn install(slots: &FileSlots, image: &[u8]) -> Result<Slot, SlotError> {
    install_update(slots, &mut &image[..], image.len() as u64, &Digest::of(image))
}

#[test]
fn an_installed_update_boots_on_the_next_reboot_and_stays_once_confirmed() {
    let (_dir, slots) = device();
    let new_image = vec![0x5a; 300_000];

    assert_eq!(install(&slots, &new_image).unwrap(), Slot::B);
    assert_eq!(fs::read(slots.slot_path(Slot::B)).unwrap(), new_image);
    assert_eq!(boot(&slots).unwrap(), Slot::B);
    assert_eq!(confirm_boot(&slots).unwrap(), BootEnv::new(Slot::B, BOOTLIMIT));

    for _ in 0..2 * BOOTLIMIT {
        assert_eq!(boot(&slots).unwrap(), Slot::B);
    }
    assert_eq!(slots.env().unwrap(), BootEnv::new(Slot::B, BOOTLIMIT));
}

#[test]
fn an_update_never_confirmed_returns_to_the_old_slot_after_bootlimit_reboots_with_its_image_untouched() {
    let (_dir, slots) = device();
    install(&slots, b"system image 2.0, broken").unwrap();

    for _ in 0..BOOTLIMIT {
        assert_eq!(boot(&slots).unwrap(), Slot::B);
    }
    assert_eq!(boot(&slots).unwrap(), Slot::A);
    assert_eq!(boot(&slots).unwrap(), Slot::A);
    assert_eq!(slots.env().unwrap(), BootEnv::new(Slot::A, BOOTLIMIT));
    assert_eq!(fs::read(slots.slot_path(Slot::A)).unwrap(), OLD_IMAGE);
}

#[test]
fn an_image_with_the_wrong_sha256_leaves_the_inactive_slot_and_the_env_unchanged() {
    let (dir, slots) = device();
    fs::write(slots.slot_path(Slot::B), b"what slot B held before").unwrap();
    let image = b"system image 2.0";

    let err = install_update(&slots, &mut &image[..], image.len() as u64, &Digest::of(b"another image")).unwrap_err();

    assert!(matches!(err, SlotError::HashMismatch { slot: Slot::B, .. }), "{err}");
    assert_eq!(fs::read(slots.slot_path(Slot::B)).unwrap(), b"what slot B held before");
    assert_eq!(slots.env().unwrap(), BootEnv::new(Slot::A, BOOTLIMIT));
    assert_eq!(boot(&slots).unwrap(), Slot::A);
    let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["bootenv.json", "slot-a.img", "slot-b.img"], "no temporary file is left behind");
}

#[test]
fn an_image_shorter_or_longer_than_its_length_is_refused_and_the_slot_kept() {
    let (_dir, slots) = device();
    let image = b"system image 2.0";
    let digest = Digest::of(image);

    let short = install_update(&slots, &mut &image[..], image.len() as u64 + 1, &digest).unwrap_err();
    assert!(matches!(short, SlotError::ImageTooShort { expected: 17, received: 16, .. }), "{short}");
    let long = install_update(&slots, &mut &image[..], image.len() as u64 - 1, &digest).unwrap_err();
    assert!(matches!(long, SlotError::ImageTooLong { expected: 15, .. }), "{long}");

    assert_eq!(fs::read(slots.slot_path(Slot::B)).unwrap(), b"");
    assert_eq!(slots.env().unwrap(), BootEnv::new(Slot::A, BOOTLIMIT));
}

#[test]
fn a_second_update_while_one_is_pending_is_refused_and_the_fallback_slot_kept() {
    let (_dir, slots) = device();
    install(&slots, b"system image 2.0").unwrap();
    boot(&slots).unwrap();

    let err = install(&slots, b"system image 3.0").unwrap_err();

    assert!(matches!(err, SlotError::UpgradePending { pending: Slot::B }), "{err}");
    assert_eq!(fs::read(slots.slot_path(Slot::A)).unwrap(), OLD_IMAGE);
    assert_eq!(fs::read(slots.slot_path(Slot::B)).unwrap(), b"system image 2.0");
}

#[test]
fn after_a_rollback_the_next_update_goes_into_the_failed_slot() {
    let (_dir, slots) = device();
    install(&slots, b"system image 2.0, broken").unwrap();
    for _ in 0..=BOOTLIMIT {
        boot(&slots).unwrap();
    }

    assert_eq!(install(&slots, b"system image 2.1").unwrap(), Slot::B);
    assert_eq!(boot(&slots).unwrap(), Slot::B);
    assert_eq!(fs::read(slots.slot_path(Slot::B)).unwrap(), b"system image 2.1");
}

#[test]
fn a_corrupt_or_missing_env_is_an_error_that_says_what_to_write() {
    let (_dir, slots) = device();
    fs::write(slots.env_path(), b"{\"active\": \"B\", \"upgrade_ava").unwrap();

    let corrupt = boot(&slots).unwrap_err();
    assert!(matches!(corrupt, SlotError::EnvCorrupt { .. }), "{corrupt}");
    assert!(corrupt.to_string().contains("naming the slot the running system booted from"), "{corrupt}");

    fs::remove_file(slots.env_path()).unwrap();
    let missing = install(&slots, b"system image 2.0").unwrap_err();
    assert!(matches!(missing, SlotError::EnvMissing { .. }), "{missing}");
    assert_eq!(fs::read(slots.slot_path(Slot::B)).unwrap(), b"", "nothing is written without an env");
}

/// Two fixed-size "partitions" as plain files of 64 KiB, slot A holding `OLD_IMAGE`.
fn partitions() -> (TempDir, PartitionSlots) {
    let dir = tempfile::tempdir().unwrap();
    let slots = PartitionSlots::new(dir.path().join("p2"), dir.path().join("p3"), dir.path().join("fw_env"));
    for slot in [Slot::A, Slot::B] {
        fs::write(slots.slot_path(slot), vec![0u8; 64 * 1024]).unwrap();
    }
    let mut a = fs::read(slots.slot_path(Slot::A)).unwrap();
    a[..OLD_IMAGE.len()].copy_from_slice(OLD_IMAGE);
    fs::write(slots.slot_path(Slot::A), a).unwrap();
    slots.write_env(&BootEnv::new(Slot::A, BOOTLIMIT)).unwrap();
    (dir, slots)
}

#[test]
fn partition_env_is_key_value_text_a_bootloader_reads() {
    let (_dir, slots) = partitions();
    install_update(&slots, &mut &b"new"[..], 3, &Digest::of(b"new")).unwrap();
    assert_eq!(
        fs::read_to_string(slots.env_path()).unwrap(),
        "active=B\nupgrade_available=1\nbootcount=0\nbootlimit=3\n"
    );
    assert_eq!(boot(&slots).unwrap(), Slot::B);
    assert_eq!(slots.env().unwrap().bootcount, 1);
}

#[test]
fn partition_image_larger_than_the_partition_is_refused_before_writing() {
    let (_dir, slots) = partitions();
    let image = vec![0x77; 64 * 1024 + 1];
    let err = install_update(&slots, &mut &image[..], image.len() as u64, &Digest::of(&image)).unwrap_err();
    assert!(matches!(err, SlotError::ImageTooBig { slot: Slot::B, capacity: 65_536, .. }), "{err}");
    assert!(err.to_string().contains("nothing was written"), "{err}");
    assert_eq!(fs::read(slots.slot_path(Slot::B)).unwrap(), vec![0u8; 64 * 1024]);
    assert_eq!(slots.env().unwrap(), BootEnv::new(Slot::A, BOOTLIMIT));
}

#[test]
fn partition_env_that_is_not_key_value_text_is_an_error_naming_the_field() {
    let (_dir, slots) = partitions();
    fs::write(slots.env_path(), "active=C\nupgrade_available=0\nbootcount=0\nbootlimit=3\n").unwrap();
    let err = boot(&slots).unwrap_err();
    assert!(matches!(err, SlotError::EnvInvalid { .. }) && err.to_string().contains("active"), "{err}");
}

#[test]
fn program_slots_are_written_executable_in_their_own_directories() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let slots = FileSlots::for_programs(dir.path(), "edge-agent");
    slots.write_env(&BootEnv::new(Slot::A, BOOTLIMIT)).unwrap();
    install(&slots, b"#!/bin/sh\nexit 0\n").unwrap();
    let path = slots.slot_path(Slot::B);
    assert_eq!(path, dir.path().join("b/edge-agent"));
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o755);
}

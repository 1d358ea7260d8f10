//! Garbage collection: forget the images no workload uses, then delete the
//! blobs and unpacked layers no remaining image references.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use ota::Digest;
use serde::Serialize;

use super::error::IoContext;
use super::index::Index;
use super::oci::{self, Manifest};
use super::{ImageError, ImageStore};

/// A partial download untouched this long was abandoned; younger ones are
/// kept for the next pull to resume (gc runs between a failed pull and its retry).
const PARTIAL_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// What a gc removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// References dropped from the index.
    pub images_removed: Vec<String>,
    pub blobs_removed: usize,
    pub layers_removed: usize,
    /// Abandoned partial downloads and leftovers of interrupted pulls.
    pub temporaries_removed: usize,
    /// Disk space given back, in bytes.
    pub bytes_freed: u64,
}

impl ImageStore {
    /// Removes every image whose manifest digest is not in `in_use`, then
    /// whatever no remaining image references. Waits for pulls and imports
    /// under way to finish first.
    pub fn gc(&self, in_use: &[String]) -> Result<GcReport, ImageError> {
        let _lock = self.lock_exclusive()?;
        let mut report = GcReport::default();

        let keep: HashSet<&str> = in_use.iter().map(String::as_str).collect();
        let drop_unused = |index: &mut Index| -> Vec<String> {
            let (kept, removed) =
                std::mem::take(&mut index.images).into_iter().partition(|(_, digest)| keep.contains(digest.as_str()));
            index.images = kept;
            removed.into_keys().collect()
        };
        // The index changes before anything is deleted, so a crash never
        // leaves an image listed without its content. On a full disk, the
        // reserve makes room for that write.
        report.images_removed = match self.update_index(drop_unused) {
            Err(e) if e.is_no_space() && self.release_reserve() => self.update_index(drop_unused)?,
            other => other?,
        };

        let index = Index::load(&self.index_path())?;
        let roots = index.images.values().chain(in_use).filter_map(|d| d.parse::<Digest>().ok());
        let (blobs, layers) = self.live(roots)?;

        // Nothing else runs now: everything in tmp/ is left over from a crash.
        for entry in read_dir(&self.tmp_dir())? {
            report.bytes_freed += remove(&entry)?;
            report.temporaries_removed += 1;
        }
        for entry in read_dir(&self.partial_dir())? {
            let stored = hex_digest(&entry).is_some_and(|d| self.has_blob(&d));
            let modified = fs::symlink_metadata(&entry).and_then(|m| m.modified()).at(&entry)?;
            let age = SystemTime::now().duration_since(modified).unwrap_or_default();
            if stored || age > PARTIAL_MAX_AGE {
                report.bytes_freed += remove(&entry)?;
                report.temporaries_removed += 1;
            }
        }
        for entry in read_dir(&self.blobs_dir())? {
            if hex_digest(&entry).is_some_and(|d| !blobs.contains(&d)) {
                report.bytes_freed += remove(&entry)?;
                report.blobs_removed += 1;
            }
        }
        for entry in read_dir(&self.layers_dir())? {
            if hex_digest(&entry).is_some_and(|d| !layers.contains(&d)) {
                // Renamed out first so a crash mid-delete leaves no half layer in place.
                let doomed = self.staging("gc");
                fs::rename(&entry, doomed.path()).at(&entry)?;
                report.bytes_freed += remove(doomed.path())?;
                report.layers_removed += 1;
            }
        }
        self.ensure_reserve();
        Ok(report)
    }

    /// The blobs and layers reachable from the given manifest digests.
    fn live(&self, roots: impl Iterator<Item = Digest>) -> Result<(HashSet<Digest>, HashSet<Digest>), ImageError> {
        let (mut blobs, mut layers) = (HashSet::new(), HashSet::new());
        for root in roots {
            if !self.has_blob(&root) || !blobs.insert(root) {
                continue;
            }
            let what = root.to_string();
            let Manifest::Image(manifest) = oci::parse_manifest(&self.read_blob(&root)?, &what)? else {
                continue;
            };
            let config_digest = oci::descriptor_digest(manifest.config())?;
            blobs.insert(config_digest);
            for layer in manifest.layers() {
                blobs.insert(oci::descriptor_digest(layer)?);
            }
            if self.has_blob(&config_digest) {
                let config = oci::parse_config(&self.read_blob(&config_digest)?, &what)?;
                layers.extend(oci::diff_ids(&config, &manifest, &what)?);
            }
        }
        Ok((blobs, layers))
    }
}

fn read_dir(dir: &Path) -> Result<Vec<std::path::PathBuf>, ImageError> {
    fs::read_dir(dir).at(dir)?.map(|e| e.map(|e| e.path()).at(dir)).collect()
}

fn hex_digest(path: &Path) -> Option<Digest> {
    Digest::from_hex(path.file_name()?.to_str()?).ok()
}

/// Removes a file or a tree; returns the bytes it occupied on disk.
fn remove(path: &Path) -> Result<u64, ImageError> {
    let meta = fs::symlink_metadata(path).at(path)?;
    if meta.is_dir() {
        let size = disk_usage(path)?;
        fs::remove_dir_all(path).at(path)?;
        Ok(size)
    } else {
        fs::remove_file(path).at(path)?;
        Ok(meta.blocks() * 512)
    }
}

/// Blocks used under `dir`, each hardlinked inode counted once.
fn disk_usage(dir: &Path) -> Result<u64, ImageError> {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).at(&path)?;
        if seen.insert((meta.dev(), meta.ino())) {
            total += meta.blocks() * 512;
        }
        if meta.is_dir() {
            stack.extend(read_dir(&path)?);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::super::test_layout::write_layout;
    use super::*;

    #[test]
    fn gc_removes_unused_images_with_their_blobs_and_layers_and_keeps_used_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&dir.path().join("images")).unwrap();
        let used = write_layout(&dir.path().join("used"), Some("used:1"), &[("a", b"used")]);
        let unused = write_layout(&dir.path().join("unused"), Some("unused:1"), &[("a", b"unused")]);
        store.import(&dir.path().join("used")).unwrap();
        let doomed = store.import(&dir.path().join("unused")).unwrap().remove(0);

        let report = store.gc(&[used.to_string()]).unwrap();
        assert_eq!(report.images_removed, ["docker.io/library/unused:1"]);
        assert_eq!((report.blobs_removed, report.layers_removed), (3, 1));
        assert!(report.bytes_freed > 0);
        assert!(store.find("used:1").unwrap().is_some());
        assert!(store.find(&unused.to_string()).unwrap().is_none());
        assert!(!doomed.layers[0].exists());
        assert!(!store.has_blob(&unused));
    }

    #[test]
    fn gc_removes_crash_leftovers_but_keeps_a_recent_partial_download() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        fs::write(store.tmp_dir().join("layer-1-0"), b"half").unwrap();
        let stored = Digest::of(b"stored");
        store.write_blob(&stored, b"stored").unwrap();
        fs::write(store.partial_path(&stored), b"sto").unwrap();
        let pending = Digest::of(b"pending");
        fs::write(store.partial_path(&pending), b"pen").unwrap();

        let report = store.gc(&[]).unwrap();
        assert_eq!(report.temporaries_removed, 2);
        assert!(!store.partial_path(&stored).exists());
        assert!(store.partial_path(&pending).exists(), "a recent partial is kept for the next pull");
    }
}

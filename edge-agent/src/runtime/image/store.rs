//! The content-addressed store on disk: paths, atomic installs, locks, and
//! reading images back.

use std::fs::{self, File};
use std::io::{BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use ota::Digest;

use super::error::IoContext;
use super::index::{self, Index};
use super::oci::{self, Compression, Manifest};
use super::{unpack, Image, ImageError};

/// Space kept in the store for gc to rewrite the index on a full disk.
const RESERVE_BYTES: usize = 64 * 1024;

/// The image store rooted at one directory (`Paths::images()`).
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// Held for a whole pull or import (shared) or a gc (exclusive), so gc never
/// deletes what a pull has stored but not yet recorded in the index.
pub(crate) type StoreLock = Flock<File>;

impl ImageStore {
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let store = Self { dir: dir.to_path_buf() };
        for sub in [store.blobs_dir(), store.partial_dir(), store.layers_dir(), store.tmp_dir()] {
            fs::create_dir_all(&sub).at(&sub)?;
        }
        store.ensure_reserve();
        Ok(store)
    }

    /// A local image by reference (`busybox`, `reg:5000/app:1`,
    /// `reg:5000/app@sha256:...`) or by manifest digest (`sha256:...`).
    /// Never touches the network.
    pub fn find(&self, reference: &str) -> Result<Option<Image>, ImageError> {
        let index = Index::load(&self.index_path())?;
        if let Ok(digest) = reference.parse::<Digest>() {
            return self.find_digest(&index, &digest.to_string());
        }
        let parsed = index::parse_reference(reference)?;
        if let Some(digest) = index.images.get(&parsed.whole()) {
            return self.load_image(&parsed.whole(), digest).map(Some);
        }
        match parsed.digest() {
            Some(digest) => self.find_digest(&index, digest),
            None => Ok(None),
        }
    }

    /// Every image in the index, sorted by reference.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let index = Index::load(&self.index_path())?;
        index.images.iter().map(|(reference, digest)| self.load_image(reference, digest)).collect()
    }

    fn find_digest(&self, index: &Index, digest: &str) -> Result<Option<Image>, ImageError> {
        match index.references_of(digest).next() {
            Some(reference) => self.load_image(reference, digest).map(Some),
            None => Ok(None),
        }
    }

    /// Reads an installed image back from its manifest.
    pub(crate) fn load_image(&self, reference: &str, digest: &str) -> Result<Image, ImageError> {
        let manifest_digest = oci::parse_digest(digest)?;
        let bytes = self.read_blob(&manifest_digest)?;
        let Manifest::Image(manifest) = oci::parse_manifest(&bytes, digest)? else {
            return Err(self.corrupt(&manifest_digest, "the index points at an image index"));
        };
        let config_digest = oci::descriptor_digest(manifest.config())?;
        let config = oci::parse_config(&self.read_blob(&config_digest)?, digest)?;
        let layers = oci::diff_ids(&config, &manifest, digest)?
            .iter()
            .map(|id| {
                let path = self.layer_path(id);
                match path.is_dir() {
                    true => Ok(path),
                    false => Err(ImageError::CorruptStore {
                        path,
                        detail: format!("a layer of {reference} is missing; pull or import the image again"),
                    }),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Image {
            reference: reference.to_string(),
            digest: digest.to_string(),
            config: oci::image_config(&config),
            layers,
            size: manifest.config().size() + manifest.layers().iter().map(|l| l.size()).sum::<u64>(),
        })
    }

    /// Records `reference -> digest` in the index.
    pub(crate) fn record(&self, reference: &str, digest: &Digest) -> Result<(), ImageError> {
        self.update_index(|index| {
            index.images.insert(reference.to_string(), digest.to_string());
        })
    }

    /// Load, change and save the index under its own lock, so concurrent
    /// pulls do not lose each other's entries.
    pub(crate) fn update_index<T>(&self, change: impl FnOnce(&mut Index) -> T) -> Result<T, ImageError> {
        let lock_path = self.dir.join("index.lock");
        let _lock = lock(&lock_path, FlockArg::LockExclusive)?;
        let mut index = Index::load(&self.index_path())?;
        let out = change(&mut index);
        index.save(&self.index_path())?;
        Ok(out)
    }

    pub(crate) fn lock_shared(&self) -> Result<StoreLock, ImageError> {
        lock(&self.dir.join("lock"), FlockArg::LockShared)
    }

    pub(crate) fn lock_exclusive(&self) -> Result<StoreLock, ImageError> {
        lock(&self.dir.join("lock"), FlockArg::LockExclusive)
    }

    pub(crate) fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs").join("sha256")
    }

    pub(crate) fn partial_dir(&self) -> PathBuf {
        self.dir.join("partial")
    }

    pub(crate) fn layers_dir(&self) -> PathBuf {
        self.dir.join("layers")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    pub(crate) fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.partial_dir().join(digest.hex())
    }

    pub(crate) fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.layers_dir().join(diff_id.hex())
    }

    pub(crate) fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// A small blob (manifest, config) read whole, checked against its digest
    /// so a damaged store is reported rather than trusted.
    pub(crate) fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(self.corrupt(digest, "blob is missing")),
            Err(e) => return Err(ImageError::io(&path, e)),
        };
        if Digest::of(&bytes) != *digest {
            return Err(self.corrupt(digest, "blob content does not match its digest"));
        }
        Ok(bytes)
    }

    /// Stores a small blob whose content is in memory, after checking it.
    pub(crate) fn write_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), ImageError> {
        let actual = Digest::of(bytes);
        if actual != *digest {
            return Err(ImageError::DigestMismatch { blob: digest.to_string(), actual: actual.to_string() });
        }
        if self.has_blob(digest) {
            return Ok(());
        }
        let tmp = self.staging("blob");
        let mut file = File::create(tmp.path()).at(tmp.path())?;
        file.write_all(bytes).at(tmp.path())?;
        file.sync_all().at(tmp.path())?;
        self.install_blob(tmp.path(), digest)
    }

    /// Moves a complete, verified and fsync'd file into the blob store.
    pub(crate) fn install_blob(&self, verified: &Path, digest: &Digest) -> Result<(), ImageError> {
        let dest = self.blob_path(digest);
        fs::rename(verified, &dest).at(&dest)?;
        sync_dir(&self.blobs_dir())
    }

    /// Unpacks a layer blob into `layers/<diff-id>` unless it already is.
    /// `blob` may be outside the store (an import being staged).
    pub(crate) fn ensure_layer(
        &self,
        blob: &Path,
        layer: &str,
        compression: Compression,
        diff_id: &Digest,
    ) -> Result<PathBuf, ImageError> {
        let dest = self.layer_path(diff_id);
        if dest.is_dir() {
            return Ok(dest);
        }
        let staging = self.staging("layer");
        let file = File::open(blob).at(blob)?;
        unpack::unpack(BufReader::with_capacity(1 << 16, file), compression, diff_id, layer, staging.path())?;
        // Everything unpacked must be on disk before the rename makes it look complete.
        let dir = File::open(staging.path()).at(staging.path())?;
        nix::unistd::syncfs(dir.as_raw_fd()).at(staging.path())?;
        match fs::rename(staging.path(), &dest) {
            Ok(()) => sync_dir(&self.layers_dir())?,
            // Another pull unpacked the same layer meanwhile: ours is dropped.
            Err(_) if dest.is_dir() => {}
            Err(e) => return Err(ImageError::io(&dest, e)),
        }
        Ok(dest)
    }

    /// Puts back the reserve if it is missing. Best effort: on a disk already
    /// full there is none, and gc then works as long as it can.
    pub(crate) fn ensure_reserve(&self) {
        let path = self.dir.join("reserve");
        if path.exists() {
            return;
        }
        let staging = self.staging("reserve");
        let written = File::create(staging.path())
            .and_then(|mut f| f.write_all(&[0u8; RESERVE_BYTES]).and_then(|()| f.sync_all()))
            .and_then(|()| fs::rename(staging.path(), &path));
        drop(written);
    }

    /// Frees the reserve; whether there was one.
    pub(crate) fn release_reserve(&self) -> bool {
        fs::remove_file(self.dir.join("reserve")).is_ok()
    }

    /// A fresh path under `tmp/`, removed when dropped unless renamed away.
    pub(crate) fn staging(&self, prefix: &str) -> Staging {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Staging(self.tmp_dir().join(format!("{prefix}-{}-{n}", std::process::id())))
    }

    fn corrupt(&self, digest: &Digest, detail: &str) -> ImageError {
        ImageError::CorruptStore {
            path: self.blob_path(digest),
            detail: format!("{detail}; pull or import the image again"),
        }
    }
}

/// A temporary file or directory that is removed on drop if still there.
pub(crate) struct Staging(PathBuf);

impl Staging {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.0) {
            Ok(m) if m.is_dir() => drop(fs::remove_dir_all(&self.0)),
            Ok(_) => drop(fs::remove_file(&self.0)),
            Err(_) => {}
        }
    }
}

fn lock(path: &Path, arg: FlockArg) -> Result<StoreLock, ImageError> {
    let file = File::options().create(true).truncate(false).write(true).open(path).at(path)?;
    Flock::lock(file, arg).map_err(|(_, errno)| ImageError::io(path, errno.into()))
}

/// Makes a rename or a new entry in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

#[cfg(test)]
mod tests {
    use super::super::test_layout::write_layout;
    use super::*;

    #[test]
    fn a_blob_whose_content_does_not_match_its_digest_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let claimed = Digest::of(b"the real thing");
        let err = store.write_blob(&claimed, b"an impostor").unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { ref blob, .. } if *blob == claimed.to_string()), "{err}");
        assert!(!store.has_blob(&claimed));
    }

    #[test]
    fn an_image_is_found_by_short_and_full_reference_and_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        let digest = write_layout(&layout, Some("outpost/app:1"), &[("hello", b"world")]);
        let store = ImageStore::open(&dir.path().join("images")).unwrap();
        store.import(&layout).unwrap();

        for reference in [
            "outpost/app:1".to_string(),
            "docker.io/outpost/app:1".to_string(),
            digest.to_string(),
            format!("outpost/app@{digest}"),
        ] {
            let image = store.find(&reference).unwrap().unwrap_or_else(|| panic!("{reference} not found"));
            assert_eq!(image.digest, digest.to_string());
            assert_eq!(image.reference, "docker.io/outpost/app:1");
            assert_eq!(image.config.cmd, ["/bin/sh"]);
            assert_eq!(fs::read(image.layers[0].join("hello")).unwrap(), b"world");
        }
        assert_eq!(store.find("outpost/app:2").unwrap(), None);
        assert_eq!(store.list().unwrap().len(), 1);
    }
}

//! Importing images without a network: from an OCI image layout directory,
//! or from an OCI archive (that layout as a tar, as `skopeo copy ...
//! oci-archive:FILE` writes it; gzip-compressed is accepted too).
//!
//! Everything is staged under `tmp/` and verified (every blob against its
//! digest and size, every layer against its diff-id) before anything is moved
//! into the store, so a bad archive leaves the store as it was.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use ota::{Digest, HashingWriter};

use super::error::IoContext;
use super::index;
use super::oci::{self, Manifest};
use super::store::Staging;
use super::{Image, ImageError, ImageStore};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// index.json and oci-layout are small; a huge one is not a layout.
const MAX_METADATA: u64 = 16 << 20;

impl ImageStore {
    /// Imports every image named in the layout or archive at `path` and
    /// returns them. An image whose `org.opencontainers.image.ref.name` is a
    /// full reference (`name:tag`, `registry/name:tag`) is recorded under it;
    /// one without a name, or with a bare tag (no repository), is recorded
    /// under its manifest digest.
    pub fn import(&self, path: &Path) -> Result<Vec<Image>, ImageError> {
        let _lock = self.lock_shared()?;
        let staging = self.staging("import");
        fs::create_dir(staging.path()).at(staging.path())?;
        let meta = fs::metadata(path).at(path)?;
        let (source, index_json) = if meta.is_dir() {
            check_layout_version(&fs::read(path.join("oci-layout")).ok(), path)?;
            let index_path = path.join("index.json");
            let bytes = read_limited(File::open(&index_path).at(&index_path)?)
                .map_err(|e| malformed(path, format!("cannot read index.json: {e}")))?;
            (Source::Layout(path), bytes)
        } else {
            (Source::Archive, self.unpack_archive(path, staging.path())?)
        };
        let index = ImageIndex::from_reader(&index_json[..])
            .map_err(|e| malformed(path, format!("index.json is not an OCI index: {e}")))?;
        let mut import = Import { store: self, path, source, staging, used: HashMap::new() };
        import.run(&index)
    }

    /// Streams an archive once: index.json and oci-layout into memory, each
    /// blob into `staging` (checked against the digest in its name).
    fn unpack_archive(&self, path: &Path, staging: &Path) -> Result<Vec<u8>, ImageError> {
        let mut file = BufReader::new(File::open(path).at(path)?);
        let gzipped = {
            let head = io::BufRead::fill_buf(&mut file).at(path)?;
            head.starts_with(&[0x1f, 0x8b])
        };
        let reader: Box<dyn Read> = if gzipped { Box::new(MultiGzDecoder::new(file)) } else { Box::new(file) };
        let unreadable = |e: io::Error| malformed(path, format!("cannot read it as a tar: {e}"));
        let mut archive = tar::Archive::new(reader);
        let (mut index_json, mut layout) = (None, None);
        for entry in archive.entries().map_err(unreadable)? {
            let mut entry = entry.map_err(unreadable)?;
            let raw = entry.path().map_err(unreadable)?.into_owned();
            let mut parts = Vec::new();
            for component in raw.components() {
                match component {
                    Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
                    Component::CurDir | Component::RootDir => {}
                    _ => return Err(malformed(path, format!("entry {raw:?} has a '..' component"))),
                }
            }
            if !entry.header().entry_type().is_file() {
                continue;
            }
            match parts.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["index.json"] => index_json = Some(read_limited(&mut entry).map_err(unreadable)?),
                ["oci-layout"] => layout = Some(read_limited(&mut entry).map_err(unreadable)?),
                ["blobs", "sha256", hex] => {
                    let digest = Digest::from_hex(hex)
                        .map_err(|_| malformed(path, format!("blob name {raw:?} is not a sha256 digest")))?;
                    if !self.has_blob(&digest) {
                        copy_verified(&mut entry, &staging.join(hex), &digest, path)?;
                    }
                }
                _ => {}
            }
        }
        check_layout_version(&layout, path)?;
        index_json.ok_or_else(|| malformed(path, "it has no index.json".to_string()))
    }
}

enum Source<'a> {
    Layout(&'a Path),
    /// Blobs were staged while reading the archive.
    Archive,
}

struct Import<'a> {
    store: &'a ImageStore,
    path: &'a Path,
    source: Source<'a>,
    staging: Staging,
    /// Staged blobs the imported images use, to move into the store.
    used: HashMap<Digest, PathBuf>,
}

/// An image manifest chosen from the index, with the name it goes by.
struct Chosen {
    name: Option<String>,
    digest: Digest,
    manifest: Box<ImageManifest>,
}

impl Import<'_> {
    fn run(&mut self, index: &ImageIndex) -> Result<Vec<Image>, ImageError> {
        let mut chosen = Vec::new();
        for desc in index.manifests() {
            if let Some(image) = self.choose(desc)? {
                chosen.push(image);
            }
        }
        if chosen.is_empty() {
            return Err(match index.manifests().is_empty() {
                true => malformed(self.path, "its index.json lists no images".to_string()),
                false => ImageError::NoMatchingPlatform {
                    reference: self.path.display().to_string(),
                    platform: oci::this_platform(),
                },
            });
        }
        for image in &chosen {
            self.stage_image(image)?;
        }
        for (digest, staged) in self.used.drain() {
            if staged != self.store.blob_path(&digest) {
                self.store.install_blob(&staged, &digest)?;
            }
        }
        let mut images = Vec::new();
        for image in &chosen {
            let reference = match image.name.as_deref() {
                Some(name) if name.contains([':', '/', '@']) => index::normalize(name)?,
                _ => image.digest.to_string(),
            };
            self.store.record(&reference, &image.digest)?;
            images.push(self.store.load_image(&reference, &image.digest.to_string())?);
        }
        Ok(images)
    }

    /// The image manifest an index entry stands for on this machine, if any:
    /// nested indexes resolve to this platform; an entry for another
    /// platform is skipped.
    fn choose(&mut self, desc: &Descriptor) -> Result<Option<Chosen>, ImageError> {
        let name = desc.annotations().as_ref().and_then(|a| a.get(REF_NAME)).cloned();
        let mut desc = desc.clone();
        loop {
            let digest = oci::descriptor_digest(&desc)?;
            let staged = self.blob(&desc)?;
            let bytes = fs::read(&staged).at(&staged)?;
            match oci::parse_manifest(&bytes, &digest.to_string())? {
                Manifest::Image(manifest) => {
                    let foreign = desc
                        .platform()
                        .as_ref()
                        .is_some_and(|p| format!("{}/{}", p.os(), p.architecture()) != oci::this_platform());
                    return Ok((!foreign).then_some(Chosen { name, digest, manifest }));
                }
                Manifest::Index(nested) => {
                    desc = oci::select_platform(&nested, &digest.to_string())?.clone();
                }
            }
        }
    }

    /// Stages the config and layers of an image and unpacks its layers.
    fn stage_image(&mut self, image: &Chosen) -> Result<(), ImageError> {
        let what = image.digest.to_string();
        let config_path = self.blob(image.manifest.config())?;
        let config = oci::parse_config(&fs::read(&config_path).at(&config_path)?, &what)?;
        let diff_ids = oci::diff_ids(&config, &image.manifest, &what)?;
        for (layer, diff_id) in image.manifest.layers().iter().zip(diff_ids) {
            let compression = oci::layer_compression(layer)?;
            let staged = self.blob(layer)?;
            self.store.ensure_layer(&staged, layer.digest().as_ref(), compression, &diff_id)?;
        }
        Ok(())
    }

    /// A verified copy of the blob a descriptor names: the store's own if it
    /// has it, else one staged from the source.
    fn blob(&mut self, desc: &Descriptor) -> Result<PathBuf, ImageError> {
        let digest = oci::descriptor_digest(desc)?;
        if self.store.has_blob(&digest) {
            return Ok(self.store.blob_path(&digest));
        }
        let staged = self.staging.path().join(digest.hex());
        if !staged.exists() {
            match self.source {
                Source::Layout(dir) => {
                    let src = dir.join("blobs").join("sha256").join(digest.hex());
                    let file = File::open(&src)
                        .map_err(|e| malformed(self.path, format!("blob {digest} is missing ({e})")))?;
                    copy_verified(&mut BufReader::new(file), &staged, &digest, self.path)?;
                }
                Source::Archive => {
                    return Err(malformed(self.path, format!("blob {digest} is missing")));
                }
            }
        }
        let size = fs::metadata(&staged).at(&staged)?.len();
        if size != desc.size() {
            return Err(ImageError::SizeMismatch { blob: digest.to_string(), expected: desc.size(), actual: size });
        }
        self.used.insert(digest, staged.clone());
        Ok(staged)
    }
}

/// Copies `reader` to `dest` (fsync'd), refusing content that does not hash
/// to `digest`. Read failures are the source's fault, write failures the disk's.
fn copy_verified(reader: &mut impl Read, dest: &Path, digest: &Digest, source: &Path) -> Result<(), ImageError> {
    let mut out = HashingWriter::new(File::create(dest).at(dest)?);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| malformed(source, format!("cannot read blob {digest}: {e}")))?;
        if n == 0 {
            break;
        }
        io::Write::write_all(&mut out, &buf[..n]).at(dest)?;
    }
    let (file, actual, _) = out.finish();
    file.sync_all().at(dest)?;
    if actual != *digest {
        drop(fs::remove_file(dest));
        return Err(ImageError::DigestMismatch { blob: digest.to_string(), actual: actual.to_string() });
    }
    Ok(())
}

fn check_layout_version(layout: &Option<Vec<u8>>, path: &Path) -> Result<(), ImageError> {
    let Some(bytes) = layout else {
        return Err(malformed(path, "it has no oci-layout file".to_string()));
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| malformed(path, format!("oci-layout is not JSON: {e}")))?;
    match value.get("imageLayoutVersion").and_then(|v| v.as_str()) {
        Some(v) if v.starts_with("1.") => Ok(()),
        other => Err(malformed(path, format!("unsupported imageLayoutVersion {other:?}"))),
    }
}

fn read_limited(reader: impl Read) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(MAX_METADATA + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_METADATA {
        return Err(io::Error::other("it is implausibly large"));
    }
    Ok(bytes)
}

fn malformed(path: &Path, detail: String) -> ImageError {
    ImageError::MalformedArchive { path: path.to_path_buf(), detail }
}

#[cfg(test)]
mod tests {
    use super::super::test_layout::{layer_blob, write_layout};
    use super::*;

    fn is_empty(dir: &Path) -> bool {
        fs::read_dir(dir).unwrap().next().is_none()
    }

    #[test]
    fn a_tampered_blob_is_refused_naming_it_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        let manifest = write_layout(&layout, Some("app:1"), &[("hello", b"world")]);
        let blob = layer_blob(&layout, &manifest);
        let mut bytes = fs::read(&blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&blob, bytes).unwrap();

        let store = ImageStore::open(&dir.path().join("images")).unwrap();
        let err = store.import(&layout).unwrap_err();
        let name = blob.file_name().unwrap().to_str().unwrap();
        assert!(matches!(err, ImageError::DigestMismatch { ref blob, .. } if blob.ends_with(name)), "{err}");
        assert!(store.list().unwrap().is_empty());
        for sub in [store.blobs_dir(), store.layers_dir(), store.tmp_dir()] {
            assert!(is_empty(&sub), "{} is not empty", sub.display());
        }
    }

    #[test]
    fn an_archive_of_a_layout_imports_like_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        let digest = write_layout(&layout, Some("app:1"), &[("hello", b"world")]);
        let archive = dir.path().join("app.tar");
        let mut tar = tar::Builder::new(File::create(&archive).unwrap());
        tar.append_dir_all(".", &layout).unwrap();
        tar.finish().unwrap();

        let store = ImageStore::open(&dir.path().join("images")).unwrap();
        let images = store.import(&archive).unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].digest, digest.to_string());
        assert_eq!(images[0].reference, "docker.io/library/app:1");
        assert!(is_empty(&store.tmp_dir()));
    }

    #[test]
    fn an_image_named_only_by_a_tag_is_recorded_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        let digest = write_layout(&layout, Some("latest"), &[("a", b"b")]);
        let store = ImageStore::open(&dir.path().join("images")).unwrap();
        let images = store.import(&layout).unwrap();
        assert_eq!(images[0].reference, digest.to_string());
        assert!(store.find(&digest.to_string()).unwrap().is_some());
    }

    #[test]
    fn a_directory_that_is_not_a_layout_is_refused_as_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&dir.path().join("images")).unwrap();
        let err = store.import(dir.path()).unwrap_err();
        assert!(matches!(err, ImageError::MalformedArchive { .. }), "{err}");
        assert!(err.to_string().contains("oci-layout"), "{err}");
    }
}

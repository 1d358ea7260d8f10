//! Unpacking one layer tar into its own directory, in the form overlayfs
//! expects of a lowerdir: OCI whiteouts become overlayfs whiteouts.
//!
//! The tar is untrusted. No entry may write outside the layer directory: `..`
//! components are refused, and so is any path or hardlink target that goes
//! through a symlink (which could point anywhere on the host). Files are
//! created with O_NOFOLLOW after removing whatever was there.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use nix::fcntl::AtFlags;
use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::{time_t, TimeSpec};
use nix::unistd::{fchownat, Gid, Uid};
use ota::{Digest, HashingReader};
use tar::EntryType;

use super::error::IoContext;
use super::oci::Compression;
use super::ImageError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Xattrs that steer overlayfs (redirects, metacopy, origin): a layer must
/// not carry its own, or it could make overlayfs look elsewhere.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Unpacks the layer `reader` (compressed as said) into `dest`, which must not
/// exist yet, checking that the uncompressed tar hashes to `diff_id`.
/// `layer` names the layer in errors.
pub(crate) fn unpack(
    reader: impl Read,
    compression: Compression,
    diff_id: &Digest,
    layer: &str,
    dest: &Path,
) -> Result<(), ImageError> {
    fs::DirBuilder::new().mode(0o755).create(dest).at(dest)?;
    let unreadable = |e: io::Error| ImageError::MalformedImage {
        what: format!("layer {layer}"),
        detail: format!("cannot read it as a tar: {e}"),
    };
    let decompressed: Box<dyn Read> = match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::Decoder::new(reader).map_err(unreadable)?),
    };
    let mut tar = HashingReader::new(decompressed);
    let mut unpacker = Unpacker { dest, layer, dir_times: Vec::new() };
    {
        let mut archive = tar::Archive::new(&mut tar);
        for entry in archive.entries().map_err(unreadable)? {
            let mut entry = entry.map_err(unreadable)?;
            unpacker.entry(&mut entry)?;
        }
    }
    // Directory times last: creating their children changed them.
    for (path, mtime) in unpacker.dir_times.iter().rev() {
        set_mtime(path, *mtime)?;
    }
    // The diff-id covers the whole tar, end-of-archive padding included.
    io::copy(&mut tar, &mut io::sink()).map_err(unreadable)?;
    let (actual, _) = tar.finish();
    if actual != *diff_id {
        return Err(ImageError::DigestMismatch {
            blob: format!("layer {layer} (uncompressed, diff-id {diff_id})"),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

struct Unpacker<'a> {
    dest: &'a Path,
    layer: &'a str,
    dir_times: Vec<(PathBuf, u64)>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<(), ImageError> {
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let rel = self.safe_relative(&raw)?;
        let (Some(parent_rel), Some(name)) = (rel.parent(), rel.file_name()) else {
            // The layer root itself: its attributes come from the image's top, not from here.
            return Ok(());
        };
        let parent = self.make_parents(parent_rel, &raw)?;
        let name_str = name.to_string_lossy();

        if name_str == OPAQUE_WHITEOUT {
            return xattr::set(&parent, OPAQUE_XATTR, b"y").at(&parent);
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            // `.wh..wh.*` other than opaque is aufs bookkeeping, meaningless to overlayfs.
            if hidden.starts_with(WHITEOUT_PREFIX) {
                return Ok(());
            }
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(self.unsafe_entry(&raw, "is a whiteout of nothing"));
            }
            let path = parent.join(OsStr::from_bytes(&name.as_bytes()[WHITEOUT_PREFIX.len()..]));
            remove_existing(&path)?;
            return mknod(&path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).at(&path);
        }

        let path = parent.join(name);
        let xattrs = pax_xattrs(entry).map_err(|e| self.bad_header(&raw, e))?;
        let header = entry.header();
        let id = |raw_id: io::Result<u64>| {
            raw_id.and_then(|n| u32::try_from(n).map_err(|_| io::Error::other(format!("id {n} is out of range"))))
        };
        let uid = id(header.uid()).map_err(|e| self.bad_header(&raw, e))?;
        let gid = id(header.gid()).map_err(|e| self.bad_header(&raw, e))?;
        let mode = header.mode().map_err(|e| self.bad_header(&raw, e))? & 0o7777;
        let mtime = header.mtime().map_err(|e| self.bad_header(&raw, e))?;

        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    _ => {
                        remove_existing(&path)?;
                        fs::DirBuilder::new().mode(0o700).create(&path).at(&path)?;
                    }
                }
                self.dir_times.push((path.clone(), mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_existing(&path)?;
                let mut file = File::options()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .at(&path)?;
                self.copy(entry, &mut file, &path)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_entry(&raw, "is a symlink without a target"))?
                    .into_owned();
                remove_existing(&path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).at(&path)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_entry(&raw, "is a hardlink without a target"))?
                    .into_owned();
                let source = self.hardlink_source(&target, &raw)?;
                remove_existing(&path)?;
                // A hardlink shares its inode: owner, mode and times are the target's.
                return fs::hard_link(&source, &path).at(&path);
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let sflag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = header.device_major().map_err(|e| self.bad_header(&raw, e))?;
                let minor = header.device_minor().map_err(|e| self.bad_header(&raw, e))?;
                let dev = makedev(major.unwrap_or(0).into(), minor.unwrap_or(0).into());
                remove_existing(&path)?;
                mknod(&path, sflag, Mode::empty(), dev).at(&path)?;
            }
            other => {
                return Err(ImageError::MalformedImage {
                    what: format!("layer {}", self.layer),
                    detail: format!("entry {:?} has unsupported tar type {other:?}", lossy(&raw)),
                })
            }
        }

        // Owner before mode: chown clears the setuid and setgid bits.
        fchownat(None, &path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::AT_SYMLINK_NOFOLLOW)
            .at(&path)?;
        if kind != EntryType::Symlink {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).at(&path)?;
        }
        for (name, value) in xattrs {
            xattr::set(&path, &name, &value).at(&path)?;
        }
        if kind != EntryType::Directory {
            set_mtime(&path, mtime)?;
        }
        Ok(())
    }

    /// The entry path relative to the layer root: a leading `/` or `./` is
    /// dropped, `..` is refused.
    fn safe_relative(&self, raw: &[u8]) -> Result<PathBuf, ImageError> {
        let mut rel = PathBuf::new();
        for component in Path::new(OsStr::from_bytes(raw)).components() {
            match component {
                Component::Normal(part) => rel.push(part),
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(self.unsafe_entry(raw, "has a '..' component"))
                }
            }
        }
        Ok(rel)
    }

    /// Creates the missing directories of `rel` under the layer root, refusing
    /// to go through a symlink or a non-directory.
    fn make_parents(&self, rel: &Path, raw: &[u8]) -> Result<PathBuf, ImageError> {
        let mut path = self.dest.to_path_buf();
        for part in rel.components() {
            path.push(part);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => return Err(self.unsafe_entry(raw, "goes through a symlink")),
                Ok(_) => return Err(self.unsafe_entry(raw, "goes through a non-directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new().mode(0o755).create(&path).at(&path)?;
                }
                Err(e) => return Err(ImageError::io(&path, e)),
            }
        }
        Ok(path)
    }

    /// Where a hardlink points: an existing non-directory of this layer,
    /// reached without going through a symlink.
    fn hardlink_source(&self, target: &[u8], raw: &[u8]) -> Result<PathBuf, ImageError> {
        let rel = self.safe_relative(target)?;
        let mut path = self.dest.to_path_buf();
        let parts: Vec<_> = rel.components().collect();
        for (i, part) in parts.iter().enumerate() {
            path.push(part);
            let last = i + 1 == parts.len();
            match fs::symlink_metadata(&path) {
                Ok(m) if !last && m.is_dir() => {}
                Ok(m) if last && !m.is_dir() => return Ok(path),
                Ok(_) | Err(_) => {
                    return Err(self.unsafe_entry(
                        raw,
                        &format!("is a hardlink to {:?}, not a file earlier in this layer", lossy(target)),
                    ))
                }
            }
        }
        Err(self.unsafe_entry(raw, "is a hardlink to the layer root"))
    }

    /// Copies file content; read failures are the layer's fault, write
    /// failures the disk's.
    fn copy<R: Read>(&self, entry: &mut tar::Entry<R>, file: &mut File, path: &Path) -> Result<(), ImageError> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = entry.read(&mut buf).map_err(|e| ImageError::MalformedImage {
                what: format!("layer {}", self.layer),
                detail: format!("cannot read {}: {e}", path.display()),
            })?;
            if n == 0 {
                return Ok(());
            }
            file.write_all(&buf[..n]).at(path)?;
        }
    }

    fn unsafe_entry(&self, raw: &[u8], detail: &str) -> ImageError {
        ImageError::UnsafeLayer { layer: self.layer.to_string(), entry: lossy(raw), detail: detail.to_string() }
    }

    fn bad_header(&self, raw: &[u8], e: io::Error) -> ImageError {
        ImageError::MalformedImage {
            what: format!("layer {}", self.layer),
            detail: format!("entry {:?} has a bad header: {e}", lossy(raw)),
        }
    }
}

fn pax_xattrs<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(extensions) = entry.pax_extensions()? {
        for ext in extensions {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if !name.starts_with(OVERLAY_XATTR_PREFIX) {
                    out.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

/// Clears the way for a new entry; never follows a symlink.
fn remove_existing(path: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).at(path),
        Ok(_) => fs::remove_file(path).at(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io(path, e)),
    }
}

fn set_mtime(path: &Path, mtime: u64) -> Result<(), ImageError> {
    // time_t: i64, but i32 on 32-bit glibc (armv7), where a time past 2038 saturates too.
    let t = TimeSpec::new(time_t::try_from(mtime).unwrap_or(time_t::MAX), 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).at(path)
}

fn lossy(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "unpack tests need root (mknod of whiteouts, chown, trusted.* xattrs): run them as root, as CI does"
        );
    }

    /// Builds layer tars entry by entry, including entries a well-behaved
    /// tar writer refuses to make.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }

        fn header(kind: EntryType, name: &[u8], mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_600_000_000);
            h
        }

        fn add(mut self, mut h: tar::Header, data: &[u8]) -> Self {
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn dir(self, name: &str) -> Self {
            self.add(Self::header(EntryType::Directory, name.as_bytes(), 0o755, 0), b"")
        }

        fn file(self, name: &str, data: &[u8]) -> Self {
            self.add(Self::header(EntryType::Regular, name.as_bytes(), 0o644, data.len() as u64), data)
        }

        fn link(self, kind: EntryType, name: &str, target: &str) -> Self {
            let mut h = Self::header(kind, name.as_bytes(), 0o777, 0);
            h.set_link_name_literal(target).unwrap();
            self.add(h, b"")
        }

        /// A PAX header that gives the next entry these records.
        fn pax(self, records: &[(&str, &[u8])]) -> Self {
            let mut data = Vec::new();
            for (key, value) in records {
                let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
                let mut len = body.len() + 1;
                while format!("{len}").len() + body.len() != len {
                    len += 1;
                }
                data.extend_from_slice(format!("{len}").as_bytes());
                data.extend_from_slice(&body);
            }
            self.add(Self::header(EntryType::XHeader, b"pax", 0o644, data.len() as u64), &data)
        }

        fn build(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn unpack_tar(tar: &[u8], dest: &Path) -> Result<(), ImageError> {
        unpack(tar, Compression::None, &Digest::of(tar), "test-layer", dest)
    }

    #[test]
    fn whiteouts_become_overlayfs_character_devices_and_opaque_directories() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        let tar = Layer::new().dir("etc/").file("etc/.wh.motd", b"").file("var/cache/.wh..wh..opq", b"").build();
        unpack_tar(&tar, &dest).unwrap();

        let motd = fs::symlink_metadata(dest.join("etc/motd")).unwrap();
        assert!(motd.file_type().is_char_device());
        assert_eq!(motd.rdev(), 0);
        assert!(!dest.join("etc/.wh.motd").exists());
        assert_eq!(xattr::get(dest.join("var/cache"), OPAQUE_XATTR).unwrap(), Some(b"y".to_vec()));
        assert!(!dest.join("var/cache/.wh..wh..opq").exists());
    }

    #[test]
    fn ownership_modes_xattrs_symlinks_and_hardlinks_are_preserved() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        let mut owned = Layer::header(EntryType::Regular, b"bin/tool", 0o4755, 3);
        owned.set_uid(1234);
        owned.set_gid(5678);
        let tar = Layer::new()
            .dir("bin/")
            .add(owned, b"abc")
            .link(EntryType::Symlink, "bin/sh", "/bin/busybox")
            .link(EntryType::Link, "bin/tool2", "bin/tool")
            .pax(&[("SCHILY.xattr.user.origin", b"outpost"), ("SCHILY.xattr.trusted.overlay.redirect", b"/etc")])
            .file("data", b"x")
            .build();
        unpack_tar(&tar, &dest).unwrap();

        let tool = fs::symlink_metadata(dest.join("bin/tool")).unwrap();
        assert_eq!((tool.uid(), tool.gid()), (1234, 5678));
        assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid survives the chown");
        assert_eq!(tool.mtime(), 1_600_000_000);
        assert_eq!(fs::read_link(dest.join("bin/sh")).unwrap(), Path::new("/bin/busybox"));
        assert_eq!(fs::symlink_metadata(dest.join("bin/tool2")).unwrap().ino(), tool.ino());
        assert_eq!(xattr::get(dest.join("data"), "user.origin").unwrap(), Some(b"outpost".to_vec()));
        assert_eq!(
            xattr::get(dest.join("data"), "trusted.overlay.redirect").unwrap(),
            None,
            "a layer's own overlayfs xattrs are dropped"
        );
    }

    #[test]
    fn an_entry_climbing_out_with_dotdot_is_refused() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let tar = Layer::new().file("../escaped", b"pwned").build();
        let err = unpack_tar(&tar, &dir.path().join("layer")).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
        assert!(!dir.path().join("escaped").exists());
    }

    #[test]
    fn a_file_written_through_a_symlink_is_refused_and_nothing_escapes() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let tar = Layer::new()
            .link(EntryType::Symlink, "sneaky", outside.to_str().unwrap())
            .file("sneaky/passwd", b"pwned")
            .build();
        let err = unpack_tar(&tar, &dir.path().join("layer")).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
        assert!(!outside.join("passwd").exists());
    }

    #[test]
    fn a_hardlink_to_a_file_outside_the_layer_is_refused() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, b"host secret").unwrap();
        for tar in [
            Layer::new().link(EntryType::Link, "stolen", "../secret").build(),
            Layer::new()
                .link(EntryType::Symlink, "up", dir.path().to_str().unwrap())
                .link(EntryType::Link, "stolen", "up/secret")
                .build(),
        ] {
            let dest = dir.path().join("layer");
            let err = unpack_tar(&tar, &dest).unwrap_err();
            assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
            assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
            fs::remove_dir_all(&dest).unwrap();
        }
    }

    #[test]
    fn an_absolute_entry_path_lands_inside_the_layer() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        unpack_tar(&Layer::new().file("/etc/hostname", b"edge").build(), &dest).unwrap();
        assert_eq!(fs::read(dest.join("etc/hostname")).unwrap(), b"edge");
    }

    #[test]
    fn a_layer_that_does_not_hash_to_its_diff_id_is_refused() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let tar = Layer::new().file("a", b"a").build();
        let wrong = Digest::of(b"something else");
        let err = unpack(&tar[..], Compression::None, &wrong, "test-layer", &dir.path().join("layer")).unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("test-layer"), "{err}");
    }

    #[test]
    fn gzip_and_zstd_layers_unpack_and_verify_against_the_uncompressed_tar() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let tar = Layer::new().file("hello", b"world").build();
        let diff_id = Digest::of(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for (name, blob, compression) in [("gz", gz, Compression::Gzip), ("zst", zst, Compression::Zstd)] {
            let dest = dir.path().join(name);
            unpack(&blob[..], compression, &diff_id, name, &dest).unwrap();
            assert_eq!(fs::read(dest.join("hello")).unwrap(), b"world");
        }
    }

    #[test]
    fn a_truncated_layer_is_reported_as_malformed() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let tar = Layer::new().file("big", &[1u8; 4096]).build();
        let err = unpack(&tar[..1000], Compression::None, &Digest::of(&tar), "cut", &dir.path().join("l")).unwrap_err();
        assert!(matches!(err, ImageError::MalformedImage { .. }), "{err}");
    }
}

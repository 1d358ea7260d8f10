//! What can go wrong with images, worded for the operator: what is wrong and
//! what to do about it.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{reference:?} is not a valid image reference ({detail})")]
    InvalidReference { reference: String, detail: String },

    #[error(
        "image {reference} was not found in registry {registry}: \
         check the repository name and tag, and that the image was pushed there"
    )]
    NotFound { reference: String, registry: String },

    #[error(
        "registry {registry} refused access to {reference}: the image may not exist, \
         or it needs credentials (only anonymous pulls are supported)"
    )]
    Unauthorized { reference: String, registry: String },

    #[error(
        "cannot reach registry {registry} ({detail}): check the network and the registry \
         address, add it to the insecure registries if it serves plain HTTP, or bring the \
         image as an archive and use `edge-agent import`"
    )]
    RegistryUnreachable { registry: String, detail: String },

    #[error("talking to registry {registry} failed: {detail}")]
    Registry { registry: String, detail: String },

    #[error(
        "downloading {blob} from {registry} failed {attempts} times in a row ({detail}); \
         the partial download is kept and the next pull resumes it"
    )]
    DownloadFailed { blob: String, registry: String, attempts: u32, detail: String },

    #[error(
        "content of {blob} does not match its digest (got {actual}): the source is corrupt \
         or was tampered with; nothing from it was stored"
    )]
    DigestMismatch { blob: String, actual: String },

    #[error(
        "{blob} is {actual} bytes but its descriptor says {expected}: the source is corrupt \
         or was tampered with; nothing from it was stored"
    )]
    SizeMismatch { blob: String, expected: u64, actual: u64 },

    #[error(
        "no space left on the device holding {dir}: run `edge-agent gc` to remove unused \
         images, or free space, then retry"
    )]
    NoSpace { dir: PathBuf },

    #[error("{what} has media type {media_type}, which edge-agent does not support")]
    UnsupportedMediaType { what: String, media_type: String },

    #[error("image {reference} has no variant for this machine ({platform})")]
    NoMatchingPlatform { reference: String, platform: String },

    #[error("{path} is not a usable OCI image layout or archive: {detail}")]
    MalformedArchive { path: PathBuf, detail: String },

    #[error("{what} is malformed: {detail}")]
    MalformedImage { what: String, detail: String },

    #[error("layer {layer} is unsafe: entry {entry:?} {detail}; refusing the image (broken or malicious)")]
    UnsafeLayer { layer: String, entry: String, detail: String },

    #[error("the image store at {path} is damaged: {detail}")]
    CorruptStore { path: PathBuf, detail: String },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl ImageError {
    /// An I/O failure at `path`; a full disk gets its own variant so the caller
    /// can collect garbage and retry.
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Self::NoSpace {
                dir: if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(path).to_path_buf() },
            },
            _ => Self::Io { path: path.to_path_buf(), source },
        }
    }

    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::NoSpace { .. })
    }
}

/// Attaches the path an I/O error happened at.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(path, e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn at(self, path: &Path) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(path, io::Error::from(e)))
    }
}

//! Images: pull, import, unpack, collect.
//!
//! The store under `Paths::images()`:
//! - `blobs/sha256/<hex>`: verified content (manifests, configs, layer blobs);
//! - `partial/<hex>`: downloads under way, kept so a later pull resumes them;
//! - `layers/<diff-id hex>/`: each layer unpacked once, whiteouts in overlayfs
//!   form, ready to stack as a lowerdir; shared by every image that uses it;
//! - `index.json`: image reference -> manifest digest;
//! - `tmp/`: staging, renamed into place when complete, so a crash never
//!   leaves something that looks complete and is not.

mod error;
mod gc;
mod import;
mod index;
mod oci;
mod pull;
mod reference;
mod store;
#[cfg(test)]
mod test_layout;
mod unpack;

pub use error::ImageError;
pub use gc::GcReport;
pub use pull::{mirror_host, NoProgress, PullOptions, PullProgress};
pub use store::ImageStore;

use std::path::PathBuf;

use serde::Serialize;

/// An image ready to run: every layer is unpacked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Image {
    /// Normalized reference (`registry/repository:tag`); the manifest digest
    /// when the image was imported without a name.
    pub reference: String,
    /// Digest of the image manifest, `sha256:...`.
    pub digest: String,
    pub config: ImageConfig,
    /// Unpacked layer directories, lowest first (overlayfs lists lowerdirs
    /// highest first: reverse them).
    pub layers: Vec<PathBuf>,
    /// Bytes of the config and layer blobs as stored (compressed).
    pub size: u64,
}

/// What the image says about how to run it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

//! Outpost's trust crate: content digests and resumable, verified downloads
//! now; signed metadata and A/B slots next.

pub mod digest;
pub mod download;

pub use digest::{Digest, DigestParseError, Hasher, HashingReader, HashingWriter};
pub use download::{fetch, Download, DownloadError, RetryPolicy};

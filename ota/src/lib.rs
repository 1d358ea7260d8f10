//! Outpost's trust crate: content digests now; signed metadata, resumable
//! downloads and A/B slots next.

pub mod digest;

pub use digest::{Digest, DigestParseError, Hasher, HashingReader, HashingWriter};

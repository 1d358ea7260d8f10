//! Outpost's trust crate: content digests and Ed25519 keys; signed metadata,
//! resumable downloads and A/B slots next.

pub mod canonical;
pub mod digest;
mod hex;
pub mod keys;
pub mod metadata;

pub use digest::{Digest, DigestParseError, Hasher, HashingReader, HashingWriter};
pub use keys::{KeyError, PublicKey, SigningKey};

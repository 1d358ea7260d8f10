//! Outpost's trust crate: what a device checks before it installs an update,
//! and how it fetches it.
//!
//! - [`digest`]: SHA-256 content digests, hashed while content streams.
//! - [`keys`]: Ed25519 keys on ring; a key's id is the SHA-256 of its public key.
//! - [`canonical`]: canonical JSON, the bytes signatures cover.
//! - [`metadata`]: TUF-shaped roles (root, targets, snapshot, timestamp).
//! - [`deployment`]: fleet deployments signed by the root's `deployments` role.
//! - [`verify`]: threshold signatures, root rotation, anti-rollback, expiry
//!   with clock skew, size caps, version consistency between roles, and
//!   target hardware, length and hash checks, all with the clock passed in.
//! - [`download`]: downloads that resume from the byte where a drop left
//!   them, capped at their signed length, verified, optionally paced.
//! - [`slots`]: A/B slots (files, or block devices with a text boot
//!   environment a bootloader reads) that roll an update back when it does
//!   not confirm itself healthy within its boot limit.

pub mod canonical;
pub mod deployment;
pub mod digest;
pub mod download;
mod hex;
pub mod keys;
pub mod metadata;
pub mod slots;
pub mod verify;

pub use deployment::{sign_deployment, sign_desired, verify_deployment, verify_desired, DeploymentError};
pub use digest::{Digest, DigestParseError, Hasher, HashingReader, HashingWriter};
pub use download::{fetch, Download, DownloadError, RetryPolicy};
pub use keys::{KeyError, PublicKey, SigningKey};
pub use slots::{boot, confirm_boot, install_update, BootEnv, FileSlots, PartitionSlots, Slot, SlotBackend, SlotError};
pub use verify::{TrustedState, VerifyError, Versions};

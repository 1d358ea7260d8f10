//! Everything that runs workloads on this device: images, the OCI spec, the
//! rootfs, the per-workload shim, and the supervisor that drives the shims.

pub mod cgroups;
pub mod health;
pub mod image;
pub mod logs;
pub mod paths;
pub mod record;
pub mod restart;
pub mod rootfs;
pub mod shim;
pub mod spec;
pub mod status;
pub mod supervisor;

pub use paths::Paths;
pub use supervisor::{RuntimeError, RuntimeSettings, Supervisor};

//! Everything that runs workloads on this device: images, the OCI spec, the
//! rootfs, the per-workload shim, and the supervisor that drives the shims.

pub mod image;
pub mod paths;

pub use paths::Paths;

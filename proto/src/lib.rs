//! What the Outpost edge-agent and hub say to each other, and what operators write.

pub mod size;
pub mod workload;

pub use size::ByteSize;
pub use workload::WorkloadSpec;

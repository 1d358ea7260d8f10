//! What the Outpost edge-agent and hub say to each other, and what operators write.

pub mod desired;
pub mod event;
pub mod fleet;
pub mod size;
pub mod sync;
pub mod workload;

pub use desired::{Deployment, DesiredState};
pub use event::{Event, EventKind};
pub use fleet::DeploymentSpec;
pub use size::ByteSize;
pub use workload::WorkloadSpec;

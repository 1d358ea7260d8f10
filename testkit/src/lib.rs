//! Helpers for Outpost's tests, examples and benchmarks. Each helper that needs
//! root or an outside tool fails loudly, saying what is missing: a test that
//! cannot run here is a failure, never a silent skip.

pub mod agent;
pub mod chaos;
pub mod constrained;
pub mod fleet;
pub mod http;
pub mod hub;
pub mod image;
pub mod layers;
pub mod loopfs;
pub mod mosquitto;
pub mod netns;
pub mod proxy;
pub mod registry;
pub mod soak;
pub mod trust;
pub mod tuf;

pub use fleet::{FailureScript, SimSpec, SimulatedFleet};
pub use mosquitto::Mosquitto;
pub use proxy::CuttingProxy;
pub use registry::Registry;

/// Imports the busybox test image into `agent`'s store; returns the reference to run it by.
pub fn import_busybox(agent: &agent::Agent) -> String {
    agent.ok(&["import", image::busybox_layout().to_str().unwrap()]);
    image::BUSYBOX_TAG.to_string()
}

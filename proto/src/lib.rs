//! What the Outpost edge-agent and hub say to each other, and what operators write.

pub mod desired;
pub mod event;
pub mod federation;
pub mod fleet;
pub mod size;
pub mod sync;
pub mod workload;

pub use desired::{AgentUpdate, Deployment, DesiredState, Signature};
pub use event::{Event, EventKind, UpdateOrigin};
pub use fleet::DeploymentSpec;
pub use size::ByteSize;
pub use workload::WorkloadSpec;

/// An error and its causes on one line: an HTTP client's own message alone
/// rarely says what went wrong.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

//! Fleet deployments and their rollouts.

pub mod pin;
pub mod policy;

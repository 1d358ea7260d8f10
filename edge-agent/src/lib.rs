//! Outpost's device agent.
//!
//! `runtime` runs workloads (images, OCI spec, shims); `cli` is the command line.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod identity;
pub mod reconcile;
pub mod rollback;
pub mod runtime;
pub mod store;
pub mod sync;
pub mod trust;
pub mod update;

//! End-to-end tests: a hub in-process on loopback, and simulated devices.
//! One test binary, one module per concern.

mod acl;
mod api;
mod artifacts;
mod broker;
mod cli;
mod commands;
mod epoch;
mod federation;
mod fleet;
mod identity;
mod mosquitto;
mod pin;
mod rollouts;
mod signed;
mod support;
mod sync;

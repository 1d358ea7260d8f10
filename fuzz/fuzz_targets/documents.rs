//! The documents operators write (TOML or JSON): desired states and workload
//! specs are refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_proto::{DesiredState, WorkloadSpec};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = DesiredState::parse(text);
        let _ = WorkloadSpec::parse(text);
    }
});

//! Every payload a hub or a device can receive, decoded from arbitrary bytes:
//! a decoder may refuse, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_proto::sync::{decode, Ack, CommandMessage, DesiredMessage, EventBatch, LogsMessage, Presence, Report};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<DesiredMessage>(data).map(|m| m.state.validate());
    let _ = decode::<Ack>(data);
    let _ = decode::<CommandMessage>(data);
    let _ = decode::<Report>(data);
    let _ = decode::<EventBatch>(data);
    let _ = decode::<Presence>(data);
    let _ = decode::<LogsMessage>(data);
});

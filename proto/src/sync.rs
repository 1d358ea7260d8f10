//! The sync protocol between an agent and its hub, over MQTT. The reference
//! is docs/protocol.md; this module is its single source of truth.
//!
//! Every payload carries the protocol version `v`, and a reader ignores the
//! fields it does not know, so either side can be upgraded first. Payloads are
//! CBOR on the wire (small, for metered links) or JSON (for debugging); a
//! reader accepts both, told apart by the first byte.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::desired::DesiredState;
use crate::event::Event;

pub const PROTOCOL_VERSION: u32 = 1;

/// Topics under a configurable prefix, one subtree per device:
/// `{prefix}/{device}/{channel}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

/// What a topic carries, and in which direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// hub -> device, QoS 1, retained: the whole desired state.
    Desired,
    /// hub -> device, QoS 1, retained: what the hub has stored of the device's reports and events.
    Ack,
    /// hub -> device, QoS 1: do something now.
    Command,
    /// device -> hub, QoS 1: workload states, changes or full.
    Reported,
    /// device -> hub, QoS 1: events, in sequence.
    Events,
    /// device -> hub, QoS 1, retained, and the device's last will: online or offline.
    Presence,
    /// device -> hub, QoS 1: a workload's last log lines, the reply to a `send-logs` command.
    Logs,
}

impl Channel {
    const ALL: [Channel; 7] = [
        Channel::Desired,
        Channel::Ack,
        Channel::Command,
        Channel::Reported,
        Channel::Events,
        Channel::Presence,
        Channel::Logs,
    ];

    fn name(self) -> &'static str {
        match self {
            Channel::Desired => "desired",
            Channel::Ack => "ack",
            Channel::Command => "command",
            Channel::Reported => "reported",
            Channel::Events => "events",
            Channel::Presence => "presence",
            Channel::Logs => "logs",
        }
    }
}

impl Topics {
    /// The default prefix carries the protocol's major version.
    pub const DEFAULT_PREFIX: &'static str = "outpost/v1";

    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.trim_end_matches('/').to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn topic(&self, device: &str, channel: Channel) -> String {
        format!("{}/{device}/{}", self.prefix, channel.name())
    }

    /// Every device's topics of one channel, for the hub's subscriptions.
    pub fn all(&self, channel: Channel) -> String {
        format!("{}/+/{}", self.prefix, channel.name())
    }

    /// The device and channel of a topic under this prefix.
    pub fn parse<'a>(&self, topic: &'a str) -> Option<(&'a str, Channel)> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (device, channel) = rest.split_once('/')?;
        let channel = Channel::ALL.into_iter().find(|c| c.name() == channel)?;
        (!device.is_empty() && !device.contains('/')).then_some((device, channel))
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self::new(Self::DEFAULT_PREFIX)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    #[default]
    Cbor,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the payload is not valid CBOR for this message: {0}")]
    Cbor(String),
    #[error("the payload is not valid JSON for this message: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn encode<T: Serialize>(encoding: Encoding, message: &T) -> Vec<u8> {
    match encoding {
        Encoding::Json => serde_json::to_vec(message).expect("protocol messages serialize"),
        Encoding::Cbor => {
            let mut out = Vec::new();
            ciborium::into_writer(message, &mut out).expect("protocol messages serialize");
            out
        }
    }
}

/// Decodes either encoding: JSON starts with `{`, a CBOR map never does.
///
/// Any version is read: a newer minor version only adds fields, which are
/// ignored; a breaking change would live under another topic prefix.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    if payload.first() == Some(&b'{') {
        Ok(serde_json::from_slice(payload)?)
    } else {
        ciborium::from_reader(payload).map_err(|e| DecodeError::Cbor(e.to_string()))
    }
}

/// hub -> device, retained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredMessage {
    pub v: u32,
    pub state: DesiredState,
}

/// hub -> device, retained: what the hub has stored. The device drops its
/// outbox up to here; until then it sends again after every reconnect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub v: u32,
    /// The epoch of the device's store these numbers count in (see `Report::epoch`).
    /// A device ignores an ack of another epoch: it acknowledges another store's
    /// messages, under numbers this store hands out again.
    #[serde(default)]
    pub epoch: u64,
    /// Highest event sequence number stored (events arrive in order).
    #[serde(default)]
    pub events: u64,
    /// Highest report sequence number stored.
    #[serde(default)]
    pub reports: u64,
}

/// hub -> device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMessage {
    pub v: u32,
    pub id: u64,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    /// Send every workload's state, not only the changes: the hub saw a gap.
    FullReport,
    RestartWorkload {
        name: String,
    },
    SendLogs {
        name: String,
        tail: usize,
    },
}

/// device -> hub. Numbered: a hub that sees a gap asks for a full report, so
/// it never holds a stale view without knowing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub v: u32,
    /// Made at random when the device's store is created: numbers from a
    /// wiped or replaced store start again at 1 under a new epoch, and the
    /// hub starts counting afresh. 0 from an agent that predates epochs.
    #[serde(default)]
    pub epoch: u64,
    pub seq: u64,
    /// True: `workloads` is every workload on the device. False: only those
    /// that changed since report `seq - 1`, and `removed` those that went.
    pub full: bool,
    /// The generation the device stored (acknowledged) last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadReport {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// As `edge-agent ps` shows it: running, backoff, exited, crash-loop, lost...
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

/// device -> hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    pub v: u32,
    /// As in `Report`: the store whose numbering the events' `seq` follow.
    #[serde(default)]
    pub epoch: u64,
    pub events: Vec<Event>,
    /// The oldest event the device still holds. The numbers between the
    /// hub's newest and it were acknowledged or dropped past the device's
    /// cap: a jump over them loses nothing. A batch that jumps higher came
    /// ahead of one the device still holds (a batch the broker dropped, or a
    /// stale one sent after a reconnect): the hub stores nothing from the
    /// jump on, and the device's next resend fills it. None from agents
    /// before it: the hub stores whatever is above its newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_held: Option<u64>,
}

/// Lines a `send-logs` reply carries at most, whatever `tail` asked for.
pub const MAX_LOG_LINES: usize = 1000;
/// Bytes of lines a `send-logs` reply carries at most: the newest lines that fit.
pub const MAX_LOG_BYTES: usize = 64 * 1024;

/// device -> hub, not retained: the reply to a `send-logs` command. Not kept
/// in the device's outbox: it answers a live request, and an operator whose
/// reply was lost asks again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsMessage {
    pub v: u32,
    /// The id of the command this answers.
    pub command: u64,
    pub workload: String,
    /// The last lines, oldest first, as `edge-agent logs` prints them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
    /// True when older lines were left out to stay within `MAX_LOG_LINES`
    /// and `MAX_LOG_BYTES`, though `tail` asked for them.
    #[serde(default)]
    pub truncated: bool,
    /// Why there are no lines: no such workload, or its logs cannot be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// device -> hub, retained; the device's last will says `online: false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub v: u32,
    pub online: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    #[test]
    fn topics_round_trip_and_refuse_strangers() {
        let topics = Topics::new("site-7/outpost/v1/");
        let t = topics.topic("pump-3", Channel::Reported);
        assert_eq!(t, "site-7/outpost/v1/pump-3/reported");
        assert_eq!(topics.parse(&t), Some(("pump-3", Channel::Reported)));
        assert_eq!(topics.all(Channel::Events), "site-7/outpost/v1/+/events");
        assert_eq!(topics.parse("site-7/outpost/v1/pump-3/unknown"), None);
        assert_eq!(topics.parse("other/pump-3/reported"), None);
        assert_eq!(topics.parse("site-7/outpost/v1/a/b/reported"), None);
        assert_eq!(topics.parse("site-7/outpost/v1/pump-3/logs"), Some(("pump-3", Channel::Logs)));
    }

    #[test]
    fn both_encodings_decode_to_the_same_message() {
        let report = Report {
            v: 1,
            epoch: 0x5eed,
            seq: 7,
            full: false,
            generation: Some(3),
            agent_version: "0.1.0".into(),
            workloads: vec![WorkloadReport {
                name: "web".into(),
                deployment: Some("app".into()),
                revision: Some(2),
                state: "running".into(),
                health: Some("healthy".into()),
                restarts: 0,
                last_exit: None,
            }],
            removed: vec!["old".into()],
        };
        let cbor = encode(Encoding::Cbor, &report);
        let json = encode(Encoding::Json, &report);
        assert!(cbor.len() < json.len(), "CBOR {} bytes, JSON {}", cbor.len(), json.len());
        assert_eq!(decode::<Report>(&cbor).unwrap(), report);
        assert_eq!(decode::<Report>(&json).unwrap(), report);
    }

    #[test]
    fn unknown_fields_from_a_newer_peer_are_ignored() {
        let ack: Ack = decode(br#"{"v":2,"events":9,"reports":4,"compressed":true}"#).unwrap();
        assert_eq!((ack.events, ack.reports), (9, 4));
        let command: CommandMessage = decode(br#"{"v":1,"id":3,"command":"full-report","why":"gap"}"#).unwrap();
        assert_eq!(command.command, Command::FullReport);
    }

    #[test]
    fn messages_from_a_peer_that_predates_epochs_read_as_epoch_0() {
        let ack: Ack = decode(br#"{"v":1,"events":9,"reports":4}"#).unwrap();
        assert_eq!((ack.epoch, ack.events, ack.reports), (0, 9, 4));
        let report: Report = decode(br#"{"v":1,"seq":3,"full":true}"#).unwrap();
        assert_eq!((report.epoch, report.seq), (0, 3));
        let batch: EventBatch = decode(br#"{"v":1,"events":[]}"#).unwrap();
        assert_eq!(batch.epoch, 0);
    }

    #[test]
    fn a_logs_reply_round_trips_with_its_error_or_its_lines() {
        let unknown = LogsMessage {
            v: 1,
            command: 4,
            workload: "web".into(),
            lines: vec![],
            truncated: false,
            error: Some("no workload named \"web\"".into()),
        };
        let json = encode(Encoding::Json, &unknown);
        assert!(!String::from_utf8_lossy(&json).contains("lines"), "empty lines are left out");
        assert_eq!(decode::<LogsMessage>(&json).unwrap(), unknown);
        let lines = LogsMessage { lines: vec!["a".into(), "b".into()], truncated: true, error: None, ..unknown };
        assert_eq!(decode::<LogsMessage>(&encode(Encoding::Cbor, &lines)).unwrap(), lines);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        for payload in [&b""[..], b"{", b"\xff\xff\xff", b"[1,2,3]", b"{\"v\":\"one\"}"] {
            assert!(decode::<Report>(payload).is_err(), "{payload:?}");
            assert!(decode::<LogsMessage>(payload).is_err(), "{payload:?}");
        }
    }

    #[test]
    fn events_keep_their_kind_through_cbor() {
        let batch = EventBatch {
            v: 1,
            epoch: 9,
            events: vec![Event {
                seq: 4,
                at: 1,
                kind: EventKind::RolledBack {
                    deployment: "a".into(),
                    from_revision: 3,
                    to_revision: 2,
                    reason: "crash loop".into(),
                },
            }],
            oldest_held: Some(4),
        };
        assert_eq!(decode::<EventBatch>(&encode(Encoding::Cbor, &batch)).unwrap(), batch);
    }
}

//! The newest logs reply from each device for each workload, in memory.
//!
//! Not in the store: a reply answers an operator who is waiting for it now,
//! it is up to 64 KiB that would be written to disk for one reading, and it
//! is stale minutes later. A hub restart loses the replies; the operator asks
//! again. Replies are kept a while and only so many, so that memory stays
//! bounded (256 replies of 64 KiB: 16 MiB at most).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use outpost_proto::sync::LogsMessage;
use serde::{Deserialize, Serialize};

/// A reply is dropped this long after it came.
const KEPT_MS: u64 = 10 * 60 * 1000;
/// Replies kept at most: past it, the oldest go.
const MAX_REPLIES: usize = 256;

/// A device's reply to `send-logs`, as the API shows it. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsReply {
    /// The id of the command it answers.
    pub command: u64,
    pub workload: String,
    pub received_at: u64,
    pub lines: Vec<String>,
    /// The device left out older lines to stay within its limits.
    pub truncated: bool,
    /// Why there are no lines: no such workload, or its logs cannot be read.
    pub error: Option<String>,
}

/// Shared by the sync task, which adds replies, and the API, which reads them.
pub type SharedReplies = Arc<Mutex<Replies>>;

#[derive(Debug, Default)]
pub struct Replies {
    /// (device, workload) -> the reply to the newest command.
    replies: BTreeMap<(String, String), LogsReply>,
}

impl Replies {
    /// Keeps the reply unless one to a newer command is already here.
    pub fn insert(&mut self, device: &str, message: LogsMessage, now: u64) {
        self.replies.retain(|_, reply| now.saturating_sub(reply.received_at) < KEPT_MS);
        let key = (device.to_string(), message.workload.clone());
        if self.replies.get(&key).is_some_and(|kept| kept.command > message.command) {
            return;
        }
        let reply = LogsReply {
            command: message.command,
            workload: message.workload,
            received_at: now,
            lines: message.lines,
            truncated: message.truncated,
            error: message.error,
        };
        self.replies.insert(key, reply);
        while self.replies.len() > MAX_REPLIES {
            let oldest = self.replies.iter().min_by_key(|(_, reply)| reply.received_at).map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.replies.remove(&oldest);
            }
        }
    }

    pub fn get(&self, device: &str, workload: &str) -> Option<&LogsReply> {
        self.replies.get(&(device.to_string(), workload.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use outpost_proto::sync::PROTOCOL_VERSION;

    use super::*;

    fn message(command: u64, workload: &str, line: &str) -> LogsMessage {
        LogsMessage {
            v: PROTOCOL_VERSION,
            command,
            workload: workload.into(),
            lines: vec![line.into()],
            truncated: false,
            error: None,
        }
    }

    #[test]
    fn the_reply_to_the_newest_command_is_kept_per_device_and_workload() {
        let mut replies = Replies::default();
        replies.insert("d", message(2, "web", "second"), 10);
        replies.insert("d", message(1, "web", "first, late"), 20);
        replies.insert("d", message(3, "db", "db"), 30);
        replies.insert("e", message(9, "web", "other device"), 40);
        let web = replies.get("d", "web").unwrap();
        assert_eq!((web.command, web.lines.as_slice(), web.received_at), (2, &["second".to_string()][..], 10));
        assert_eq!(replies.get("d", "db").unwrap().command, 3);
        assert_eq!(replies.get("e", "web").unwrap().command, 9);
        assert!(replies.get("d", "cache").is_none());
        replies.insert("d", message(4, "web", "fourth"), 50);
        assert_eq!(replies.get("d", "web").unwrap().command, 4);
    }

    #[test]
    fn replies_go_after_a_while_and_past_the_cap_the_oldest_first() {
        let mut replies = Replies::default();
        replies.insert("d", message(1, "web", "old"), 0);
        replies.insert("d", message(2, "db", "new"), KEPT_MS);
        assert!(replies.get("d", "web").is_none(), "kept past its time");
        assert!(replies.get("d", "db").is_some());

        let mut replies = Replies::default();
        for n in 0..=MAX_REPLIES as u64 {
            replies.insert("d", message(n, &format!("w{n}"), "x"), n);
        }
        assert_eq!(replies.replies.len(), MAX_REPLIES);
        assert!(replies.get("d", "w0").is_none(), "the oldest went");
        assert!(replies.get("d", &format!("w{MAX_REPLIES}")).is_some());
    }
}

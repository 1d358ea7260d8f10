//! Between a site hub and its parent (docs/federation.md): the site hub is
//! one MQTT client of its parent's broker, under `{prefix}/sites/{site}/`.
//!
//! Up, the site forwards what its devices said (reports, events, presence)
//! as numbered items in batches, compressed, from a queue on its disk; the
//! parent applies each item as if the device had said it (its numbering
//! drops what it has already) and acknowledges the highest item stored.
//! Down, the parent publishes each of the site's devices' desired states,
//! retained, on a topic per device, which the site stores and serves, and
//! operators' commands for them, which the site passes on (their logs
//! replies come back up with the rest).

use serde::{Deserialize, Serialize};

use crate::sync::{EventBatch, LogsMessage, Presence, Report};

/// What a site topic carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteChannel {
    /// site -> parent, QoS 1: a [`SiteBatch`], zstd-compressed.
    Up,
    /// site -> parent, QoS 1, retained, and the site's last will: a
    /// [`crate::sync::Presence`] of the site itself.
    Presence,
    /// parent -> site, QoS 1, retained: a [`SiteAck`].
    Ack,
    /// parent -> site, QoS 1, retained: a device's
    /// [`crate::sync::DesiredMessage`].
    Desired(String),
    /// parent -> site, QoS 1: a [`crate::sync::CommandMessage`] for a device,
    /// which the site passes on.
    Command(String),
}

/// Topics under `{prefix}/sites/{site}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteTopics {
    prefix: String,
}

impl SiteTopics {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: format!("{}/sites", prefix.trim_end_matches('/')) }
    }

    pub fn topic(&self, site: &str, channel: &SiteChannel) -> String {
        match channel {
            SiteChannel::Up => format!("{}/{site}/up", self.prefix),
            SiteChannel::Presence => format!("{}/{site}/presence", self.prefix),
            SiteChannel::Ack => format!("{}/{site}/ack", self.prefix),
            SiteChannel::Desired(device) => format!("{}/{site}/desired/{device}", self.prefix),
            SiteChannel::Command(device) => format!("{}/{site}/command/{device}", self.prefix),
        }
    }

    /// Every device's desired state of one site, for the site's subscription.
    pub fn all_desired(&self, site: &str) -> String {
        format!("{}/{site}/desired/+", self.prefix)
    }

    /// Every device's commands of one site, for the site's subscription.
    pub fn all_commands(&self, site: &str) -> String {
        format!("{}/{site}/command/+", self.prefix)
    }

    /// Every site's topic of a site -> parent channel, for the parent's subscriptions.
    pub fn all(&self, channel: &SiteChannel) -> String {
        self.topic("+", channel)
    }

    /// The site and channel of a topic under this prefix.
    pub fn parse(&self, topic: &str) -> Option<(String, SiteChannel)> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let site = parts.next().filter(|s| !s.is_empty())?.to_string();
        let channel = match (parts.next()?, parts.next(), parts.next()) {
            ("up", None, _) => SiteChannel::Up,
            ("presence", None, _) => SiteChannel::Presence,
            ("ack", None, _) => SiteChannel::Ack,
            ("desired", Some(device), None) if !device.is_empty() => SiteChannel::Desired(device.to_string()),
            ("command", Some(device), None) if !device.is_empty() => SiteChannel::Command(device.to_string()),
            _ => return None,
        };
        Some((site, channel))
    }
}

/// site -> parent: items in the order the site received them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteBatch {
    pub v: u32,
    pub items: Vec<SiteItem>,
}

/// One device's message, numbered by the site: numbers only grow, so the
/// parent stores each once however often a batch arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteItem {
    pub seq: u64,
    pub device: String,
    /// Unix milliseconds when the site received it.
    pub at: u64,
    pub message: Upward,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Upward {
    Report(Report),
    Events(EventBatch),
    Presence(Presence),
    /// The answer to a `send-logs` command the parent relayed.
    Logs(LogsMessage),
    /// The site's operator held one of the parent's deployment revisions
    /// back from the device, or let it through again.
    Held(HeldNotice),
}

/// What an operator on site did to one of the parent's rollouts
/// (`hub hold`): its revisions stop going forward at the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldAction {
    /// Devices keep the revision they have; devices without one get none.
    Pause,
    /// Devices on a later revision go back to this one.
    Rollback { to: u64 },
}

/// A hold on one of the parent's deployments, as the site hub stores and
/// shows it. It covers the revisions the site had received when it was
/// made: a newer revision from the parent lifts it, since what the cloud
/// changed after the site acted wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteHold {
    pub deployment: String,
    pub action: HoldAction,
    /// The newest revision of the deployment the site had received.
    pub covers: u64,
    pub reason: Option<String>,
    /// Unix milliseconds.
    pub at: u64,
}

/// site -> parent: a parent revision the site holds back from a device,
/// or (`hold` none) no longer does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldNotice {
    pub deployment: String,
    /// The parent's revision held back.
    pub revision: u64,
    pub hold: Option<HoldAction>,
    pub reason: Option<String>,
}

/// parent -> site, retained: the highest item the parent stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteAck {
    pub v: u32,
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_topics_round_trip_and_others_do_not_parse() {
        let topics = SiteTopics::new("outpost/v1");
        for channel in [SiteChannel::Up, SiteChannel::Presence, SiteChannel::Ack, SiteChannel::Desired("cam-1".into())]
        {
            let topic = topics.topic("rig-7", &channel);
            assert_eq!(topics.parse(&topic), Some(("rig-7".to_string(), channel)), "{topic}");
        }
        assert_eq!(
            topics.topic("rig-7", &SiteChannel::Desired("cam-1".into())),
            "outpost/v1/sites/rig-7/desired/cam-1"
        );
        assert_eq!(topics.all_desired("rig-7"), "outpost/v1/sites/rig-7/desired/+");
        assert_eq!(topics.all_commands("rig-7"), "outpost/v1/sites/rig-7/command/+");
        for other in [
            "outpost/v1/cam-1/desired",
            "outpost/v1/sites/rig-7",
            "outpost/v1/sites/rig-7/desired",
            "outpost/v1/sites/rig-7/desired/cam-1/more",
            "outpost/v1/sites//up",
            "outpost/v1/sites/rig-7/other",
        ] {
            assert_eq!(topics.parse(other), None, "{other}");
        }
    }
}

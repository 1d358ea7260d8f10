//! Who may use which MQTT topic. rumqttd has no per-topic ACLs: the embedded
//! broker asks `allows` for each PUBLISH and SUBSCRIBE (a patch, see
//! third_party/rumqttd/OUTPOST-PATCHES.md), and `mosquitto_acl` writes the
//! same rules for an external mosquitto. A device publishes only to its own
//! device -> hub topics and subscribes only to its own hub -> device topics,
//! each by its exact name; the hub's own client may do everything.

use outpost_proto::federation::{SiteChannel, SiteTopics};
use outpost_proto::sync::{Channel, Topics};

use crate::sync::{FROM_DEVICES, HUB_CLIENT_ID};

/// The hub -> device channels, which a device may subscribe to.
pub const TO_DEVICES: [Channel; 3] = [Channel::Desired, Channel::Ack, Channel::Command];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Publish,
    Subscribe,
}

/// Whether `client_id` may publish to `topic`, or subscribe to the filter
/// `topic`. The client id is the device's id: the broker checks it at
/// connection (the token's user name, or the certificate's common name).
pub fn allows(topics: &Topics, client_id: &str, access: Access, topic: &str) -> bool {
    if client_id == HUB_CLIENT_ID {
        return true;
    }
    let allowed: &[Channel] = match access {
        Access::Publish => &FROM_DEVICES,
        Access::Subscribe => &TO_DEVICES,
    };
    allowed.iter().any(|&channel| topics.topic(client_id, channel) == topic)
}

/// Whether site hub `site` may publish to `topic` or subscribe to the
/// filter `topic`: its batches and presence up; its devices' desired states,
/// its acks and its devices' commands down, each under its own site id
/// (docs/federation.md).
pub fn site_allows(topics: &SiteTopics, site: &str, access: Access, topic: &str) -> bool {
    match access {
        Access::Publish => [SiteChannel::Up, SiteChannel::Presence].iter().any(|c| topics.topic(site, c) == topic),
        Access::Subscribe => {
            [topics.all_desired(site), topics.all_commands(site), topics.topic(site, &SiteChannel::Ack)]
                .iter()
                .any(|allowed| allowed == topic)
        }
    }
}

/// A mosquitto ACL file with the same rules: `%u` is the user name, which
/// is the device id (with certificates, `use_identity_as_username true`
/// makes it the certificate's common name). `hub_user` is the hub's own
/// user name at mosquitto.
pub fn mosquitto_acl(topics: &Topics, hub_user: &str) -> String {
    let mut acl = String::from(
        "# Outpost: each device may write only its own device -> hub topics and\n\
         # read only its own hub -> device topics (docs/identity.md).\n\
         # Written by `hub mosquitto-acl`; mosquitto reads it with `acl_file`.\n\n",
    );
    if !hub_user.is_empty() {
        acl.push_str(&format!("user {hub_user}\ntopic readwrite {}/#\n\n", topics.prefix()));
    }
    for channel in FROM_DEVICES {
        acl.push_str(&format!("pattern write {}\n", topics.topic("%u", channel)));
    }
    for channel in TO_DEVICES {
        acl.push_str(&format!("pattern read {}\n", topics.topic("%u", channel)));
    }
    acl
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(client_id: &str, access: Access, topic: &str) -> bool {
        super::allows(&Topics::default(), client_id, access, topic)
    }

    #[test]
    fn a_device_publishes_only_its_own_reports_events_presence_and_logs() {
        for channel in ["reported", "events", "presence", "logs"] {
            assert!(allows("pump-3", Access::Publish, &format!("outpost/v1/pump-3/{channel}")), "{channel}");
            assert!(!allows("pump-3", Access::Publish, &format!("outpost/v1/pump-4/{channel}")), "{channel}");
        }
        for channel in ["desired", "ack", "command"] {
            assert!(!allows("pump-3", Access::Publish, &format!("outpost/v1/pump-3/{channel}")), "{channel}");
        }
        assert!(!allows("pump-3", Access::Publish, "outpost/v1/pump-3/reported/more"));
        assert!(!allows("pump-3", Access::Publish, "other/pump-3/reported"));
        assert!(!allows("pump-3", Access::Publish, ""));
    }

    #[test]
    fn a_device_subscribes_only_to_its_own_desired_state_acks_and_commands_by_name() {
        for channel in ["desired", "ack", "command"] {
            assert!(allows("pump-3", Access::Subscribe, &format!("outpost/v1/pump-3/{channel}")), "{channel}");
            assert!(!allows("pump-3", Access::Subscribe, &format!("outpost/v1/pump-4/{channel}")), "{channel}");
        }
        for filter in ["#", "outpost/v1/#", "outpost/v1/+/desired", "outpost/v1/pump-3/+", "outpost/v1/pump-3/#"] {
            assert!(!allows("pump-3", Access::Subscribe, filter), "{filter}");
        }
        assert!(!allows("pump-3", Access::Subscribe, "outpost/v1/pump-3/reported"), "its own reports are the hub's");
    }

    #[test]
    fn a_device_whose_id_looks_like_a_wildcard_gets_nothing_more() {
        assert!(!allows("+", Access::Subscribe, "outpost/v1/pump-3/desired"));
        assert!(!allows("#", Access::Publish, "outpost/v1/pump-3/reported"));
    }

    #[test]
    fn the_hub_may_do_everything() {
        assert!(allows(HUB_CLIENT_ID, Access::Subscribe, "outpost/v1/+/reported"));
        assert!(allows(HUB_CLIENT_ID, Access::Publish, "outpost/v1/pump-3/desired"));
    }

    #[test]
    fn the_mosquitto_acl_has_the_same_rules_under_the_configured_prefix() {
        let acl = mosquitto_acl(&Topics::new("fleet/x"), "outpost-hub");
        assert!(acl.contains("user outpost-hub\ntopic readwrite fleet/x/#\n"), "{acl}");
        assert!(acl.contains("pattern write fleet/x/%u/reported\n"), "{acl}");
        assert!(acl.contains("pattern write fleet/x/%u/logs\n"), "{acl}");
        assert!(acl.contains("pattern read fleet/x/%u/desired\n"), "{acl}");
        assert!(acl.contains("pattern read fleet/x/%u/command\n"), "{acl}");
        assert!(!acl.contains("pattern write fleet/x/%u/desired"), "{acl}");
        assert!(!mosquitto_acl(&Topics::default(), "").contains("user "), "no hub user: anonymous");
    }

    #[test]
    fn the_documented_mosquitto_acl_is_what_the_hub_prints_for_the_defaults() {
        assert_eq!(mosquitto_acl(&Topics::default(), HUB_CLIENT_ID), include_str!("../../docs/mosquitto-acl.conf"));
    }

    #[test]
    fn a_site_hub_uses_only_its_own_site_topics() {
        let topics = SiteTopics::new("outpost/v1");
        let allows = |access, topic: &str| site_allows(&topics, "rig-7", access, topic);
        assert!(allows(Access::Publish, "outpost/v1/sites/rig-7/up"));
        assert!(allows(Access::Publish, "outpost/v1/sites/rig-7/presence"));
        assert!(allows(Access::Subscribe, "outpost/v1/sites/rig-7/desired/+"));
        assert!(allows(Access::Subscribe, "outpost/v1/sites/rig-7/ack"));
        assert!(allows(Access::Subscribe, "outpost/v1/sites/rig-7/command/+"));
        for (access, topic) in [
            (Access::Publish, "outpost/v1/sites/rig-8/up"),
            (Access::Publish, "outpost/v1/sites/rig-7/ack"),
            (Access::Publish, "outpost/v1/sites/rig-7/desired/cam-1"),
            (Access::Publish, "outpost/v1/cam-1/reported"),
            (Access::Subscribe, "outpost/v1/sites/rig-8/desired/+"),
            (Access::Subscribe, "outpost/v1/sites/rig-8/command/+"),
            (Access::Publish, "outpost/v1/sites/rig-7/command/cam-1"),
            (Access::Subscribe, "outpost/v1/sites/+/desired/+"),
            (Access::Subscribe, "outpost/v1/sites/rig-7/#"),
            (Access::Subscribe, "outpost/v1/cam-1/desired"),
        ] {
            assert!(!allows(access, topic), "{access:?} {topic}");
        }
    }
}

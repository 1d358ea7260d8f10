//! The hub's configuration: a TOML file in which every key is optional. The
//! defaults are `default-config.toml`, embedded here and printed by
//! `hub config default`, so an operator starts from a working, commented file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use outpost_proto::sync::{Encoding, Topics};
use outpost_proto::ByteSize;
use serde::Deserialize;

use crate::registry::valid_device_id;
use crate::rollout::policy::Policy;
use crate::sync::HUB_CLIENT_ID;

pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub broker: BrokerSetting,
    pub mqtt_listen: SocketAddr,
    pub broker_username: String,
    pub broker_password: String,
    pub topic_prefix: String,
    pub encoding: Encoding,
    pub unknown_devices: UnknownDevices,
    /// Registries (`host:port`) the hub asks over plain HTTP when it pins
    /// deployment images to digests; all others over HTTPS.
    pub insecure_registries: Vec<String>,
    /// What deployments may ask of devices.
    pub policy: Policy,
    /// The site cache of artifacts and images (docs/artifacts.md).
    pub cache: CacheConfig,
    /// The operator's root.json: when set, signed deployments are verified
    /// at apply, so a bad signature is an error for the operator now rather
    /// than a refusal on every device later. Devices verify either way.
    pub trust_root: Option<PathBuf>,
    /// Device id -> token.
    pub devices: BTreeMap<String, String>,
    /// Where the embedded broker listens for devices over TLS, each
    /// identified by its client certificate (docs/identity.md); none: nowhere.
    pub mqtts_listen: Option<SocketAddr>,
    /// Where devices enroll over HTTPS (`POST /v1/enroll` only); none: nowhere.
    pub enroll_listen: Option<SocketAddr>,
    /// Whether the operators' HTTP API (`http`) speaks HTTPS.
    pub http_tls: bool,
    /// The DNS names and IP addresses in the hub's server certificate.
    pub tls_names: Vec<String>,
    /// How long an enrollment token stays usable.
    #[serde(with = "humantime_serde")]
    pub enroll_token_ttl: std::time::Duration,
    /// A site hub's parent (docs/federation.md); none: this hub is a root.
    pub upstream: Option<Upstream>,
    /// Site id -> token: the site hubs whose parent this hub is. They log in
    /// to the embedded broker as devices do, and use only their site topics.
    pub sites: BTreeMap<String, String>,
}

/// The `[upstream]` table: where a site hub forwards its devices' reports
/// and events, and takes their desired states from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Upstream {
    /// The parent's MQTT broker, "mqtt://host:port".
    pub mqtt: BrokerSetting,
    /// This site's id, listed under the parent's `[sites]`.
    pub site: String,
    /// This site's token at the parent; unused with `[upstream.tls]`.
    #[serde(default)]
    pub token: String,
    /// The parent's HTTP API, "http://host:port": the site cache fetches
    /// images and artifacts it lacks from the parent's cache, so each
    /// crosses the WAN once. None: from the registries themselves.
    #[serde(default)]
    pub http: Option<String>,
    /// MQTT over TLS to the parent's `mqtts-listen`: the parent's CA
    /// certificate, and this site's certificate (common name: the site id,
    /// from `hub issue-cert SITE --csr FILE` at the parent) and key. With
    /// them the token is not used.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

/// The `[upstream.tls]` table: PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UpstreamTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The `[cache]` table: the site cache under `data-dir/cache`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct CacheConfig {
    /// Cached blobs beyond this are evicted, least recently used first.
    pub max_size: ByteSize,
    /// Registries (`host:port`) the mirror may fetch from; empty: any.
    pub upstream_registries: Vec<String>,
    /// Where a repository name without a registry host goes; empty: refused.
    pub default_registry: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { max_size: ByteSize(20 << 30), upstream_registries: Vec::new(), default_registry: String::new() }
    }
}

/// The `unknown-devices` key: what the embedded broker does with a device
/// that is neither under `[devices]` nor approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownDevices {
    Refuse,
    /// Refused, and listed for an operator to approve (`hub approve`).
    Hold,
    /// Accepted with any token: for a lab, never a fleet.
    Accept,
}

/// The `broker` key: the hub's own broker, or one it connects to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum BrokerSetting {
    Embedded,
    External { host: String, port: u16 },
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path:?}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot parse the configuration: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Default for Config {
    /// The same values as `default-config.toml` (a test keeps them equal).
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/outpost-hub"),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            broker: BrokerSetting::Embedded,
            mqtt_listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            broker_username: String::new(),
            broker_password: String::new(),
            topic_prefix: Topics::DEFAULT_PREFIX.to_string(),
            encoding: Encoding::Cbor,
            unknown_devices: UnknownDevices::Refuse,
            insecure_registries: Vec::new(),
            policy: Policy::default(),
            cache: CacheConfig::default(),
            trust_root: None,
            devices: BTreeMap::new(),
            mqtts_listen: None,
            enroll_listen: None,
            http_tls: false,
            tls_names: vec!["localhost".to_string(), "127.0.0.1".to_string()],
            enroll_token_ttl: std::time::Duration::from_secs(24 * 3600),
            upstream: None,
            sites: BTreeMap::new(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let prefix = self.topic_prefix.trim_matches('/');
        if prefix.is_empty() || prefix.contains(['+', '#']) {
            return invalid(format!("topic-prefix {:?} must be non-empty, without `+` or `#`", self.topic_prefix));
        }
        if self.unknown_devices != UnknownDevices::Refuse && self.broker != BrokerSetting::Embedded {
            return invalid(format!(
                "unknown-devices = {:?} needs the embedded broker: an external broker authenticates devices \
                 itself (add them to its password file), so set unknown-devices = \"refuse\"",
                self.unknown_devices
            ));
        }
        if self.mqtts_listen.is_some() && self.broker != BrokerSetting::Embedded {
            return invalid(
                "mqtts-listen needs the embedded broker: configure TLS and client certificates in the \
                 external broker itself (docs/identity.md)"
                    .to_string(),
            );
        }
        if self.uses_tls() && self.tls_names.is_empty() {
            return invalid("tls-names is empty: list the names devices and operators reach the hub by".to_string());
        }
        for registry in &self.insecure_registries {
            if registry.is_empty() || registry.contains(['/', ' ']) {
                return invalid(format!("insecure-registries: {registry:?} must be a registry's host:port"));
            }
        }
        for registry in self.cache.upstream_registries.iter().chain(Some(&self.cache.default_registry)) {
            if registry.contains(['/', ' ']) {
                return invalid(format!("cache: {registry:?} must be a registry's host:port"));
            }
        }
        if let Some(registry) = self.cache.upstream_registries.iter().find(|r| r.is_empty()) {
            return invalid(format!("cache.upstream-registries: {registry:?} must be a registry's host:port"));
        }
        if let Some(path) = self.policy.allowed_host_paths.iter().find(|p| !p.is_absolute()) {
            return invalid(format!("policy.allowed-host-paths: {path:?} must be an absolute path"));
        }
        for (id, token) in &self.devices {
            if !valid_device_id(id) {
                return invalid(format!("device id {id:?} is not valid: use letters, digits, `.`, `_` and `-`"));
            }
            if id == HUB_CLIENT_ID {
                return invalid(format!("device id {id:?} is the hub's own MQTT client id: choose another"));
            }
            if token.is_empty() {
                return invalid(format!("device {id:?} has an empty token"));
            }
        }
        if !self.sites.is_empty() && self.broker != BrokerSetting::Embedded {
            return invalid(
                "[sites] needs the embedded broker: with an external one, give each site a user there and \
                 the ACL of `hub mosquitto-acl` (docs/federation.md)"
                    .to_string(),
            );
        }
        for (id, token) in &self.sites {
            if !valid_device_id(id) || id == HUB_CLIENT_ID {
                return invalid(format!("site id {id:?} is not valid: use letters, digits, `.`, `_` and `-`"));
            }
            if self.devices.contains_key(id) {
                return invalid(format!("{id:?} is both a device and a site: give the site another id"));
            }
            if token.is_empty() {
                return invalid(format!("site {id:?} has an empty token"));
            }
        }
        if let Some(upstream) = &self.upstream {
            if upstream.mqtt == BrokerSetting::Embedded {
                return invalid("upstream.mqtt must be the parent's broker, \"mqtt://host:port\"".to_string());
            }
            if let Some(http) =
                upstream.http.as_deref().filter(|h| !h.starts_with("http://") && !h.starts_with("https://"))
            {
                return invalid(format!("upstream.http {http:?} must be the parent's API, \"http://host:port\""));
            }
            if !valid_device_id(&upstream.site) || (upstream.token.is_empty() && upstream.tls.is_none()) {
                return invalid(format!(
                    "upstream: site {:?} needs a valid id, and its token at the parent or [upstream.tls]",
                    upstream.site
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Whether any listener needs the hub's CA and server certificate.
    pub fn uses_tls(&self) -> bool {
        self.mqtts_listen.is_some() || self.enroll_listen.is_some() || self.http_tls
    }
}

impl TryFrom<String> for BrokerSetting {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text == "embedded" {
            return Ok(Self::Embedded);
        }
        if text.starts_with("mqtts://") {
            return Err(format!("broker {text:?}: TLS to an external broker is not supported yet, use mqtt://"));
        }
        let wrong = || format!("broker must be \"embedded\" or \"mqtt://host:port\", not {text:?}");
        let address = text.strip_prefix("mqtt://").ok_or_else(wrong)?.trim_end_matches('/');
        // `host`, `host:port`, `[v6]` or `[v6]:port`.
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (host, port.parse().map_err(|_| wrong())?),
            _ => (address, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(['/', '@']) {
            return Err(wrong());
        }
        Ok(Self::External { host: host.to_string(), port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_file_is_the_default_config() {
        assert_eq!(Config::parse(DEFAULT_CONFIG).unwrap(), Config::default());
    }

    #[test]
    fn federation_keys_that_cannot_work_are_refused_naming_the_key() {
        let refused = |text: &str| Config::parse(text).unwrap_err().to_string();
        let err = refused("[upstream]\nmqtt = \"mqtt://cloud:1883\"\nsite = \"rig-7\"\n");
        assert!(err.contains("its token at the parent or [upstream.tls]"), "{err}");
        let err = refused(
            "[upstream]\nmqtt = \"mqtt://cloud:1883\"\nsite = \"rig-7\"\ntoken = \"t\"\nhttp = \"cloud:8080\"\n",
        );
        assert!(err.contains("upstream.http") && err.contains("http://host:port"), "{err}");
        let err = refused("[devices]\nrig-7 = \"a\"\n[sites]\nrig-7 = \"b\"\n");
        assert!(err.contains("both a device and a site"), "{err}");
        let err = refused("broker = \"mqtt://mosquitto:1883\"\n[sites]\nrig-7 = \"b\"\n");
        assert!(err.contains("[sites] needs the embedded broker"), "{err}");
        let config = Config::parse(
            "[upstream]\nmqtt = \"mqtt://cloud:8883\"\nsite = \"rig-7\"\n[upstream.tls]\nca = \"/c\"\ncert = \"/s\"\nkey = \"/k\"\n",
        )
        .unwrap();
        assert_eq!(config.upstream.unwrap().tls.unwrap().key, PathBuf::from("/k"), "a certificate instead of a token");
    }

    #[test]
    fn a_partial_file_takes_defaults_for_the_rest() {
        let config = Config::parse(
            "data-dir = \"/tmp/hub\"\nencoding = \"json\"\n[devices]\npump-3 = \"secret\"\n\"Pi_4.b\" = \"t\"\n",
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/hub"));
        assert_eq!(config.encoding, Encoding::Json);
        assert_eq!(config.devices.get("pump-3").map(String::as_str), Some("secret"));
        assert_eq!(config.broker, BrokerSetting::Embedded);
    }

    #[test]
    fn broker_urls_parse_with_a_default_port() {
        let parse = |s: &str| BrokerSetting::try_from(s.to_string());
        assert_eq!(
            parse("mqtt://broker.local:8883").unwrap(),
            BrokerSetting::External { host: "broker.local".into(), port: 8883 }
        );
        assert_eq!(parse("mqtt://10.0.0.2").unwrap(), BrokerSetting::External { host: "10.0.0.2".into(), port: 1883 });
        assert_eq!(parse("mqtt://[::1]:1884").unwrap(), BrokerSetting::External { host: "::1".into(), port: 1884 });
        assert!(parse("mqtts://x:1").unwrap_err().contains("TLS"));
        assert!(parse("http://x:1").unwrap_err().contains("mqtt://host:port"));
        assert!(parse("mqtt://x:port").is_err());
        assert!(parse("mqtt://user@x:1").is_err());
    }

    #[test]
    fn invalid_devices_and_unknown_keys_are_refused_naming_them() {
        let err = Config::parse("[devices]\n\"a/b\" = \"t\"\n").unwrap_err().to_string();
        assert!(err.contains("\"a/b\""), "{err}");
        let err = Config::parse("[devices]\noutpost-hub = \"t\"\n").unwrap_err().to_string();
        assert!(err.contains("hub's own"), "{err}");
        let err = Config::parse("[devices]\npump = \"\"\n").unwrap_err().to_string();
        assert!(err.contains("empty token"), "{err}");
        let err = Config::parse("http-listen = \"1.2.3.4:5\"\n").unwrap_err().to_string();
        assert!(err.contains("http-listen"), "{err}");
        let err = Config::parse("topic-prefix = \"a/#\"\n").unwrap_err().to_string();
        assert!(err.contains("topic-prefix"), "{err}");
        let err = Config::parse("unknown-devices = \"maybe\"\n").unwrap_err().to_string();
        assert!(err.contains("refuse") && err.contains("hold"), "{err}");
    }

    #[test]
    fn insecure_registries_and_the_policy_table_are_read_and_checked() {
        let config = Config::parse(
            "insecure-registries = [\"10.0.0.2:5000\"]\n[policy]\nallow-devices = true\nallowed-host-paths = [\"/data\"]\n",
        )
        .unwrap();
        assert_eq!(config.insecure_registries, ["10.0.0.2:5000"]);
        assert!(config.policy.allow_devices && !config.policy.allow_privileged);
        let err = Config::parse("insecure-registries = [\"http://10.0.0.2:5000\"]\n").unwrap_err().to_string();
        assert!(err.contains("host:port"), "{err}");
        let err = Config::parse("[policy]\nallowed-host-paths = [\"data\"]\n").unwrap_err().to_string();
        assert!(err.contains("policy.allowed-host-paths") && err.contains("absolute"), "{err}");
        let err = Config::parse("[policy]\nallow-everything = true\n").unwrap_err().to_string();
        assert!(err.contains("allow-everything"), "{err}");
    }

    #[test]
    fn the_cache_table_takes_a_size_with_units_and_registry_hosts() {
        let config =
            Config::parse("[cache]\nmax-size = \"512MiB\"\nupstream-registries = [\"10.0.0.2:5000\"]\n").unwrap();
        assert_eq!(config.cache.max_size, ByteSize(512 << 20));
        assert_eq!(config.cache.upstream_registries, ["10.0.0.2:5000"]);
        let err = Config::parse("[cache]\ndefault-registry = \"https://docker.io\"\n").unwrap_err().to_string();
        assert!(err.contains("host:port"), "{err}");
        let err = Config::parse("[cache]\nmax-size = \"lots\"\n").unwrap_err().to_string();
        assert!(err.contains("not a size"), "{err}");
    }

    #[test]
    fn tls_listeners_are_opt_in_and_mqtts_needs_the_embedded_broker() {
        assert!(!Config::default().uses_tls());
        let config = Config::parse("mqtts-listen = \"0.0.0.0:8883\"\nenroll-listen = \"0.0.0.0:8443\"\n").unwrap();
        assert!(config.uses_tls());
        let err = Config::parse("mqtts-listen = \"0.0.0.0:8883\"\nbroker = \"mqtt://10.0.0.2\"\n").unwrap_err();
        assert!(err.to_string().contains("external broker itself"), "{err}");
        let err = Config::parse("http-tls = true\ntls-names = []\n").unwrap_err().to_string();
        assert!(err.contains("tls-names"), "{err}");
    }

    #[test]
    fn holding_unknown_devices_needs_the_embedded_broker() {
        let config = Config::parse("unknown-devices = \"hold\"\n").unwrap();
        assert_eq!(config.unknown_devices, UnknownDevices::Hold);
        let err = Config::parse("unknown-devices = \"hold\"\nbroker = \"mqtt://10.0.0.2\"\n").unwrap_err().to_string();
        assert!(err.contains("embedded broker") && err.contains("password file"), "{err}");
    }
}

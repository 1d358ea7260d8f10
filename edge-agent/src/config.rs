//! The agent's configuration file (TOML). Every key has a default; the
//! defaults, each documented, are `default-config.toml`, which
//! `edge-agent config default` prints as a starting point.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use outpost_proto::sync::{Encoding, Topics};
use outpost_proto::ByteSize;
use serde::{Deserialize, Deserializer};

use crate::identity::IdentityPaths;
use crate::runtime::image::PullOptions;

/// Read when no file is given, if it exists.
pub const DEFAULT_PATH: &str = "/etc/outpost/agent.toml";

const DEFAULT_TOML: &str = include_str!("default-config.toml");

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Empty in the file means the hostname, filled in by `load`.
    pub device_id: String,
    /// MQTT URL of the hub; empty means no hub.
    pub hub: String,
    pub hub_token: String,
    pub topic_prefix: String,
    pub encoding: Encoding,
    #[serde(deserialize_with = "duration")]
    pub keep_alive: Duration,
    #[serde(deserialize_with = "duration")]
    pub report_interval: Duration,
    pub cgroup_parent: String,
    pub log_max_size: ByteSize,
    pub log_files: u32,
    pub insecure_registries: Vec<String>,
    /// The site's hub (`http://hub:8080`), asked for images before their
    /// registries; empty: none.
    pub registry_mirror: String,
    pub store_cache: ByteSize,
    #[serde(deserialize_with = "duration")]
    pub reconcile_interval: Duration,
    /// The operator's TUF root (root.json), read once into the store; later
    /// roots arrive signed by it (rotation), so the store's copy is the one used.
    pub trust_root: PathBuf,
    /// The hub's HTTP base (TUF metadata and artifacts); empty means none.
    pub hub_http: String,
    /// Hardware id that update targets must list; empty in the file means the
    /// machine's architecture, filled in by `load`.
    pub hardware: String,
    /// How long a freshly updated agent has to confirm itself healthy.
    #[serde(deserialize_with = "duration")]
    pub update_health_deadline: Duration,
    /// Update downloads read no faster than this per second; 0 means no cap.
    pub update_bandwidth: ByteSize,
    /// The device's key, certificate and the hub's CA certificate, for an
    /// `mqtts://` hub; empty: under `<data-dir>/identity/`.
    pub tls_key: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_ca: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: "/var/lib/outpost".into(),
            run_dir: "/run/outpost".into(),
            device_id: String::new(),
            hub: String::new(),
            hub_token: String::new(),
            topic_prefix: Topics::DEFAULT_PREFIX.into(),
            encoding: Encoding::Cbor,
            keep_alive: Duration::from_secs(120),
            report_interval: Duration::from_secs(2),
            cgroup_parent: "outpost".into(),
            log_max_size: ByteSize(1 << 20),
            log_files: 3,
            insecure_registries: Vec::new(),
            registry_mirror: String::new(),
            store_cache: ByteSize(512 << 10),
            reconcile_interval: Duration::from_secs(2),
            trust_root: "/etc/outpost/root.json".into(),
            hub_http: String::new(),
            hardware: String::new(),
            update_health_deadline: Duration::from_secs(60),
            update_bandwidth: ByteSize(0),
            tls_key: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_ca: PathBuf::new(),
        }
    }
}

impl Config {
    /// The default configuration file, each key with its comment.
    pub fn default_toml() -> &'static str {
        DEFAULT_TOML
    }

    /// Reads `path`, or `DEFAULT_PATH` when none is given and it exists, or
    /// takes the defaults; an empty `device-id` becomes the hostname.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let mut config = match path {
            Some(path) => Config::read(path)?,
            None if Path::new(DEFAULT_PATH).exists() => Config::read(Path::new(DEFAULT_PATH))?,
            None => Config::default(),
        };
        if config.device_id.is_empty() {
            config.device_id = hostname()?;
        }
        if config.hardware.is_empty() {
            config.hardware = std::env::consts::ARCH.to_string();
        }
        config.validate()?;
        Ok(config)
    }

    fn read(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
        // toml's message names the line and column and shows it.
        toml::from_str(&text).with_context(|| format!("the configuration file {} is not valid", path.display()))
    }

    /// How this device pulls images: plain HTTP for `insecure-registries`,
    /// and `registry-mirror` asked first.
    pub fn pull_options(&self) -> PullOptions {
        PullOptions {
            insecure_registries: self.insecure_registries.clone(),
            registry_mirror: Some(self.registry_mirror.clone()).filter(|m| !m.is_empty()),
            ..PullOptions::default()
        }
    }

    /// Where the device's identity files are (crate::identity).
    pub fn identity_paths(&self) -> IdentityPaths {
        let under = IdentityPaths::under(&self.data_dir);
        let or = |path: &PathBuf, default: PathBuf| if path.as_os_str().is_empty() { default } else { path.clone() };
        IdentityPaths {
            key: or(&self.tls_key, under.key),
            cert: or(&self.tls_cert, under.cert),
            ca: or(&self.tls_ca, under.ca),
        }
    }

    /// Checks the values `load` cannot leave to serde; call it again after changing any.
    pub fn validate(&self) -> anyhow::Result<()> {
        // It becomes part of MQTT topics, where `/`, `+` and `#` have meanings.
        if !self.device_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            bail!("device-id {:?} is not valid: use letters, digits, `.`, `_` and `-`", self.device_id);
        }
        if !(1..=100).contains(&self.log_files) {
            bail!("log-files is {}: keep from 1 to 100 files per workload", self.log_files);
        }
        if self.keep_alive < Duration::from_secs(5) || self.keep_alive > Duration::from_secs(65535) {
            bail!("keep-alive must be from 5s to 65535s (MQTT's limit), e.g. \"120s\"");
        }
        if self.report_interval.is_zero() {
            bail!("report-interval must be above zero, e.g. \"2s\"");
        }
        if !self.registry_mirror.is_empty() {
            crate::runtime::image::mirror_host(&self.registry_mirror).map_err(anyhow::Error::msg)?;
        }
        if self.reconcile_interval.is_zero() {
            bail!("reconcile-interval must be above zero, e.g. \"2s\"");
        }
        if self.update_health_deadline.is_zero() {
            bail!("update-health-deadline must be above zero, e.g. \"60s\"");
        }
        Ok(())
    }
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!("{text:?} is not a duration ({e}): write e.g. \"2s\" or \"500ms\""))
    })
}

fn hostname() -> anyhow::Result<String> {
    let path = "/proc/sys/kernel/hostname";
    let name = std::fs::read_to_string(path).with_context(|| format!("cannot read the hostname from {path}"))?;
    Ok(name.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    fn load_text(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path))
    }

    #[test]
    fn the_embedded_default_parses_to_the_defaults() {
        assert_eq!(parse(Config::default_toml()).unwrap(), Config::default());
    }

    #[test]
    fn every_key_of_the_default_file_has_a_comment() {
        let mut previous = "";
        for line in Config::default_toml().lines() {
            if line.contains(" = ") {
                assert!(previous.starts_with('#'), "no comment above {line:?}");
            }
            previous = line;
        }
    }

    #[test]
    fn a_partial_file_takes_the_other_keys_from_the_defaults() {
        let config =
            load_text("device-id = \"pi-7\"\nstore-cache = \"512KiB\"\nreconcile-interval = \"500ms\"\n").unwrap();
        assert_eq!(config.device_id, "pi-7");
        assert_eq!(config.store_cache, ByteSize(512 << 10));
        assert_eq!(config.reconcile_interval, Duration::from_millis(500));
        assert_eq!(config.data_dir, Config::default().data_dir);
    }

    #[test]
    fn a_registry_mirror_is_an_http_or_https_url_without_a_path() {
        let config = load_text("registry-mirror = \"http://hub.local:8080\"\n").unwrap();
        assert_eq!(config.registry_mirror, "http://hub.local:8080");
        for wrong in ["hub:8080", "http://hub:8080/v2", "ftp://hub"] {
            let err = load_text(&format!("registry-mirror = {wrong:?}\n")).unwrap_err().to_string();
            assert!(err.contains("registry-mirror") && err.contains("http://HOST"), "{err}");
        }
    }

    #[test]
    fn an_empty_device_id_becomes_the_hostname() {
        let config = load_text("").unwrap();
        assert_eq!(config.device_id, hostname().unwrap());
        assert!(!config.device_id.is_empty());
    }

    #[test]
    fn an_unknown_key_is_refused_naming_it() {
        let err = format!("{:#}", load_text("data-dir = \"/data\"\ncache-size = 3\n").unwrap_err());
        assert!(err.contains("cache-size") && err.contains("agent.toml") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn a_bad_size_or_duration_is_refused() {
        let err = format!("{:#}", load_text("log-max-size = \"12 parsecs\"\n").unwrap_err());
        assert!(err.contains("unknown size unit") && err.contains("line 1"), "{err}");
        let err = format!("{:#}", load_text("reconcile-interval = \"soon\"\n").unwrap_err());
        assert!(err.contains("not a duration"), "{err}");
    }

    #[test]
    fn a_malformed_file_is_refused_naming_the_file_and_the_line() {
        let err = format!("{:#}", load_text("hub = \"mqtt://hub.local:1883\"\nlog-files = [\n").unwrap_err());
        assert!(err.contains("agent.toml") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let err = format!("{:#}", Config::load(Some(Path::new("/nonexistent/agent.toml"))).unwrap_err());
        assert!(err.contains("/nonexistent/agent.toml"), "{err}");
    }

    #[test]
    fn values_outside_their_range_are_refused() {
        assert!(load_text("log-files = 0\n").unwrap_err().to_string().contains("log-files"));
        assert!(load_text("reconcile-interval = \"0s\"\n").unwrap_err().to_string().contains("reconcile-interval"));
        assert!(load_text("device-id = \"a/b\"\n").unwrap_err().to_string().contains("device-id"));
    }
}

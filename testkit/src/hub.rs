//! Drives the real hub binary: `hub serve` on a loopback port of its own,
//! with its embedded broker or an external one, and the operator commands
//! against its API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The hub binary of this workspace, built once per test process.
pub fn hub_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| crate::agent::build_binary("hub", "hub"))
}

/// A port free on loopback now (neither rumqttd nor mosquitto can be handed a bound listener).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

pub struct Hub {
    pub data: TempDir,
    pub http: SocketAddr,
    /// Where devices connect: the embedded broker, or the external one.
    pub mqtt: SocketAddr,
    config: PathBuf,
    /// The network namespace it runs in (entered with nsenter); none: the test's.
    netns: Option<String>,
    process: Mutex<Option<Child>>,
}

impl Hub {
    /// A hub whose embedded broker knows `devices` (id, token).
    pub fn new(devices: &[(&str, &str)]) -> Self {
        Self::new_in(&std::env::temp_dir(), devices)
    }

    /// `new`, with its data dir (store, configuration, log) made in `parent`.
    pub fn new_in(parent: &Path, devices: &[(&str, &str)]) -> Self {
        let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut broker = format!("broker = \"embedded\"\nmqtt-listen = \"{mqtt}\"\n[devices]\n");
        for (id, token) in devices {
            broker += &format!("{id} = \"{token}\"\n");
        }
        Self::start_in(parent, mqtt, &broker)
    }

    /// A hub that also takes devices with certificates over TLS on `mqtts`
    /// and their enrollments over HTTPS on `enroll` (docs/identity.md).
    pub fn with_tls(mqtts: SocketAddr, enroll: SocketAddr) -> Self {
        let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::start_in(
            &std::env::temp_dir(),
            mqtt,
            &format!(
                "broker = \"embedded\"\nmqtt-listen = \"{mqtt}\"\nmqtts-listen = \"{mqtts}\"\nenroll-listen = \"{enroll}\"\n"
            ),
        )
    }

    /// The hub CA's certificate, once a TLS listener made it.
    pub fn ca_cert(&self) -> PathBuf {
        self.data.path().join("store").join("pki").join("ca.pem")
    }

    /// A hub that logs in to the broker at `broker` as `username`; that
    /// broker authenticates the devices itself.
    pub fn external(broker: SocketAddr, username: &str, password: &str) -> Self {
        Self::start_in(
            &std::env::temp_dir(),
            broker,
            &format!("broker = \"mqtt://{broker}\"\nbroker-username = {username:?}\nbroker-password = {password:?}\n"),
        )
    }

    /// Writes the configuration, `broker` its broker's part, and starts the
    /// hub with its data dir in `parent`.
    fn start_in(parent: &Path, mqtt: SocketAddr, broker: &str) -> Self {
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let data = tempfile::Builder::new().prefix("outpost-hub-").tempdir_in(parent).expect("temp dir");
        Self::configured_in(data, None, http, mqtt, &format!("http = \"{http}\"\n{broker}"))
    }

    /// A hub with the configuration `config` (everything but `data-dir`),
    /// inside network namespace `netns` when one is given; its API answers
    /// at `http` and devices connect at `mqtt`, as seen from the test.
    pub fn configured(netns: Option<&str>, http: SocketAddr, mqtt: SocketAddr, config: &str) -> Self {
        let data = tempfile::Builder::new().prefix("outpost-hub-").tempdir().expect("temp dir");
        Self::configured_in(data, netns, http, mqtt, config)
    }

    fn configured_in(data: TempDir, netns: Option<&str>, http: SocketAddr, mqtt: SocketAddr, config: &str) -> Self {
        let config = format!("data-dir = {:?}\n{config}", data.path().join("store"));
        let path = data.path().join("hub.toml");
        std::fs::write(&path, config).unwrap();
        let netns = netns.map(str::to_string);
        let hub = Self { data, http, mqtt, config: path, netns, process: Mutex::new(None) };
        hub.start();
        hub
    }

    pub fn start(&self) {
        let log = std::fs::File::options().create(true).append(true).open(self.data.path().join("hub.log")).unwrap();
        let mut command = match &self.netns {
            Some(ns) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(hub_binary());
                command
            }
            None => Command::new(hub_binary()),
        };
        let child = command
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start hub serve");
        *self.process.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(self.http).is_err() || TcpStream::connect(self.mqtt).is_err() {
            assert!(Instant::now() < deadline, "the hub did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash or a power cut would do it.
    pub fn kill(&self) {
        if let Some(mut child) = self.process.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("hub.log")).unwrap_or_default()
    }

    /// An operator command (`hub devices`, `hub set-desired`...) against this
    /// hub. A hub in a network namespace is asked from inside it, on its
    /// loopback (it listens on every address there): an operator on site,
    /// who needs no WAN.
    pub fn cli(&self, args: &[&str]) -> Output {
        let (mut command, url) = match &self.netns {
            Some(ns) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(hub_binary());
                (command, format!("http://127.0.0.1:{}", self.http.port()))
            }
            None => (Command::new(hub_binary()), format!("http://{}", self.http)),
        };
        command.arg("--hub-url").arg(url).args(args).output().expect("cannot run hub")
    }

    /// Sets a device's desired state from a document's text, signed by the
    /// test operator (`crate::trust`); panics when refused.
    pub fn set_desired(&self, device: &str, document: &str) {
        let file = self.data.path().join(format!("desired-{device}.json"));
        std::fs::write(&file, crate::trust::operator().sign_document(document)).unwrap();
        let out = self.cli(&["set-desired", device, "-f", file.to_str().unwrap()]);
        assert!(out.status.success(), "set-desired failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// GET on the hub's API, as JSON; panics unless the answer is 200.
    pub fn get(&self, path: &str) -> Value {
        self.try_get(path).unwrap_or_else(|answer| panic!("GET {path}: {answer}"))
    }

    /// GET on the hub's API: the JSON of a 200, or the whole other answer.
    pub fn try_get(&self, path: &str) -> Result<Value, String> {
        let mut stream = TcpStream::connect(self.http).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.http)
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        if !head.starts_with("HTTP/1.1 200") {
            return Err(response);
        }
        serde_json::from_str(body).map_err(|e| format!("not JSON ({e}): {body}"))
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill();
    }
}

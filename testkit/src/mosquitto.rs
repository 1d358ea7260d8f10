//! Debian's mosquitto as the hub's external broker in tests: on a free
//! loopback port, knowing only the users it is given, each device allowed
//! only its own topics by the ACL file operators use (docs/mosquitto-acl.conf,
//! for the hub user `outpost-hub`), and with `persistence false`, so a killed
//! mosquitto started again has forgotten every session and retained message.

use std::fs::Permissions;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const INSTALL: &str = "apt-get install mosquitto";
/// What `hub mosquitto-acl` prints for the default topic prefix and the hub user `outpost-hub`.
pub const ACL: &str = include_str!("../../docs/mosquitto-acl.conf");

pub struct Mosquitto {
    dir: TempDir,
    addr: SocketAddr,
    config: PathBuf,
    process: Mutex<Option<Child>>,
}

impl Mosquitto {
    /// Starts mosquitto with `users` (name, password) in its password file;
    /// panics, saying how to install it, when mosquitto is missing.
    pub fn new(users: &[(&str, &str)]) -> Self {
        assert!(Path::new(MOSQUITTO).exists(), "this test needs {MOSQUITTO}: {INSTALL}");
        let dir = tempfile::Builder::new().prefix("outpost-mosquitto-").tempdir().expect("temp dir");
        let passwords = dir.path().join("passwd");
        let plain: String = users.iter().map(|(user, password)| format!("{user}:{password}\n")).collect();
        std::fs::write(&passwords, plain).unwrap();
        // -U hashes the plain `user:password` lines in place.
        let status = Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(&passwords)
            .status()
            .unwrap_or_else(|e| panic!("cannot run mosquitto_passwd ({e}): {INSTALL}"));
        assert!(status.success(), "mosquitto_passwd -U failed ({status})");
        // Started as root, mosquitto drops to the user `mosquitto` before it
        // reads the password file.
        std::fs::set_permissions(dir.path(), Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&passwords, Permissions::from_mode(0o644)).unwrap();
        let acl = dir.path().join("acl");
        std::fs::write(&acl, ACL).unwrap();
        std::fs::set_permissions(&acl, Permissions::from_mode(0o644)).unwrap();

        let addr = SocketAddr::from(([127, 0, 0, 1], crate::hub::free_port()));
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {} {}\nallow_anonymous false\npassword_file {}\nacl_file {}\npersistence false\n",
                addr.port(),
                addr.ip(),
                passwords.display(),
                acl.display()
            ),
        )
        .unwrap();
        let mosquitto = Self { dir, addr, config, process: Mutex::new(None) };
        mosquitto.start();
        mosquitto
    }

    /// Where clients connect: the same address across restarts.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts mosquitto (again) on its port and waits until it listens.
    pub fn start(&self) {
        let log = std::fs::File::options().create(true).append(true).open(self.log_path()).unwrap();
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MOSQUITTO} ({e}): {INSTALL}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mosquitto exited ({status}): {}", self.log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mosquitto did not listen on {}: {}", self.addr, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *self.process.lock().unwrap() = Some(child);
    }

    /// SIGKILL: every client loses its connection at once.
    pub fn kill(&self) {
        if let Some(mut child) = self.process.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

//! The processes under test: the hub (`hub serve`), and mosquitto when it is
//! the broker; and their resident memory, sampled while they work.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const HUB_USER: &str = "outpost-hub";

/// A child process with its stderr in a log file; stopped with SIGTERM when dropped.
pub struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let stderr = std::fs::File::create(&log)?;
        // SAFETY: prctl is async-signal-safe. The child dies with the thread
        // that started it (the simulator's main thread), however the simulator
        // ends: a hub left behind would hold its ports and thousands of sockets.
        unsafe {
            command.pre_exec(|| match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        Ok(Self { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts connections, or says why not with the end of the log.
    fn wait_listening(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) before listening on {addr}: {}", self.name, self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("{} does not listen on {addr} after 20 s: {}", self.name, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().fold(format!("\n-- {} --\n", self.log.display()), |mut out, line| {
            let _ = writeln!(out, "{line}");
            out
        })
    }

    /// Peak resident memory since the start (VmHWM), in KiB.
    pub fn vm_hwm_kib(&self) -> Option<u64> {
        status_kib(self.pid(), "VmHWM:")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on loopback now: neither mosquitto nor the hub's embedded
/// broker can report one they picked themselves.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Where the hub finds its broker.
pub enum HubBroker {
    /// Its own, knowing every device's token.
    Embedded {
        devices: Vec<(String, String)>,
    },
    External {
        port: u16,
        password: String,
    },
}

pub struct Hub {
    pub process: Process,
    pub api: SocketAddr,
    /// Where devices connect.
    pub mqtt: SocketAddr,
}

impl Hub {
    pub fn start(binary: &Path, dir: &Path, broker: HubBroker) -> anyhow::Result<Self> {
        let api = loopback(free_port()?);
        let mut config = format!("data-dir = {:?}\nhttp = \"{api}\"\n", dir.join("hub-store"));
        let mqtt = match broker {
            HubBroker::Embedded { devices } => {
                let mqtt = loopback(free_port()?);
                writeln!(config, "broker = \"embedded\"\nmqtt-listen = \"{mqtt}\"\n[devices]")?;
                for (id, token) in devices {
                    writeln!(config, "{id} = \"{token}\"")?;
                }
                mqtt
            }
            HubBroker::External { port, password } => {
                let mqtt = loopback(port);
                writeln!(
                    config,
                    "broker = \"mqtt://{mqtt}\"\nbroker-username = \"{HUB_USER}\"\nbroker-password = \"{password}\""
                )?;
                mqtt
            }
        };
        let path = dir.join("hub.toml");
        std::fs::write(&path, config)?;
        // The hub's own log level (no RUST_LOG): as an operator runs it.
        let mut process = Process::spawn(
            "the hub",
            Command::new(binary).args(["serve", "--config"]).arg(&path).env_remove("RUST_LOG"),
            dir.join("hub.log"),
        )?;
        process.wait_listening(api)?;
        process.wait_listening(mqtt)?;
        Ok(Self { process, api, mqtt })
    }
}

pub struct Mosquitto {
    pub process: Process,
    pub port: u16,
    pub hub_password: String,
}

impl Mosquitto {
    /// Debian's mosquitto on a free loopback port, every device and the hub
    /// in its password file. Its other settings are mosquitto's defaults but
    /// one: the queue of messages for a client. All the fleet's messages go to
    /// the hub's one client, at most 20 in flight; beyond the default queue of
    /// 1,000, mosquitto drops them ("Outgoing messages are being dropped for
    /// client outpost-hub"), and a dropped presence leaves its device offline
    /// in the hub's view. Room for a few messages per device instead.
    pub fn start(dir: &Path, devices: &[(String, String)]) -> anyhow::Result<Self> {
        if !Path::new(MOSQUITTO).exists() {
            bail!("--broker mosquitto needs {MOSQUITTO}: apt-get install mosquitto");
        }
        let hub_password = format!("hub-{}", std::process::id());
        let passwords = dir.join("passwd");
        let mut plain = format!("{HUB_USER}:{hub_password}\n");
        for (id, token) in devices {
            writeln!(plain, "{id}:{token}")?;
        }
        std::fs::write(&passwords, plain)?;
        // -U hashes a plain `user:password` file in place: one process for
        // the whole fleet rather than one per device.
        let status = Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(&passwords)
            .status()
            .context("cannot run mosquitto_passwd (apt-get install mosquitto)")?;
        if !status.success() {
            bail!("mosquitto_passwd -U failed ({status})");
        }
        let port = free_port()?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\n\
                 max_queued_messages {}\n",
                passwords.display(),
                1000 + 4 * devices.len()
            ),
        )?;
        let mut process =
            Process::spawn("mosquitto", Command::new(MOSQUITTO).arg("-c").arg(&conf), dir.join("mosquitto.log"))?;
        process.wait_listening(loopback(port))?;
        Ok(Self { process, port, hub_password })
    }
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
}

/// Samples the VmRSS of some processes every 100 ms, keeping each one's peak.
pub struct MemorySampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u64>>,
}

impl MemorySampler {
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peaks = vec![0; pids.len()];
            while !stopping.load(Ordering::Relaxed) {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    *peak = (*peak).max(status_kib(*pid, "VmRSS:").unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peaks
        });
        Self { stop, thread }
    }

    /// The peak VmRSS of each process, in KiB, in the order given.
    pub fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the memory sampler does not panic")
    }
}

//! Health probes: the verdict (a pure tracker) and the TCP and HTTP checks.
//! Exec probes run inside the container and belong to the shim.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use outpost_proto::workload::HealthProbe;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// No probe configured.
    #[default]
    None,
    /// Probed, no verdict yet.
    Starting,
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone)]
pub struct HealthTracker {
    pub health: Health,
    failures: u32,
    started: Instant,
}

impl HealthTracker {
    pub fn new(started: Instant) -> Self {
        Self { health: Health::Starting, failures: 0, started }
    }

    /// Records one probe result taken at `now`; returns the health after it.
    pub fn record(&mut self, probe: &HealthProbe, ok: bool, now: Instant) -> Health {
        if ok {
            self.failures = 0;
            self.health = Health::Healthy;
        } else if now.duration_since(self.started) >= probe.start_period {
            self.failures += 1;
            if self.failures >= probe.failure_threshold {
                self.health = Health::Unhealthy;
            }
        }
        self.health
    }
}

pub fn tcp_check(port: u16, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout).is_ok()
}

/// A GET answered with 2xx or 3xx. Written by hand so that the shim stays a
/// small single-threaded process without an async HTTP stack.
pub fn http_check(port: u16, path: &str, timeout: Duration) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: outpost-probe\r\n\r\n")?;
        let mut head = [0u8; 16];
        let mut read = 0;
        while read < 12 {
            let n = stream.read(&mut head[read..])?;
            if n == 0 {
                break;
            }
            read += n;
        }
        Ok(status_is_success(&head[..read]))
    };
    attempt().unwrap_or(false)
}

fn status_is_success(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let mut parts = text.split(' ');
    matches!(
        (parts.next(), parts.next().and_then(|c| c.parse::<u16>().ok())),
        (Some(v), Some(code)) if v.starts_with("HTTP/") && (200..400).contains(&code)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::workload::HealthCheck;
    use std::net::TcpListener;

    fn probe() -> HealthProbe {
        HealthProbe {
            check: HealthCheck::Tcp(1),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: 2,
            start_period: Duration::from_secs(5),
        }
    }

    #[test]
    fn failures_inside_the_start_period_do_not_count() {
        let t0 = Instant::now();
        let mut t = HealthTracker::new(t0);
        for _ in 0..5 {
            assert_eq!(t.record(&probe(), false, t0 + Duration::from_secs(1)), Health::Starting);
        }
    }

    #[test]
    fn threshold_failures_in_a_row_make_unhealthy_and_a_success_heals() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(10);
        let mut t = HealthTracker::new(t0);
        assert_eq!(t.record(&probe(), true, later), Health::Healthy);
        assert_eq!(t.record(&probe(), false, later), Health::Healthy);
        assert_eq!(t.record(&probe(), false, later), Health::Unhealthy);
        assert_eq!(t.record(&probe(), true, later), Health::Healthy);
    }

    #[test]
    fn http_status_lines_are_judged_by_code() {
        assert!(status_is_success(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_is_success(b"HTTP/1.0 302 Found"));
        assert!(!status_is_success(b"HTTP/1.1 503 Service"));
        assert!(!status_is_success(b"SSH-2.0-OpenSSH"));
    }

    #[test]
    fn tcp_and_http_checks_reach_a_local_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let _tcp_probe = listener.accept().unwrap();
            let (mut http_probe, _) = listener.accept().unwrap();
            let mut request = [0u8; 256];
            let _ = http_probe.read(&mut request).unwrap();
            http_probe.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        });
        assert!(tcp_check(port, Duration::from_secs(1)));
        assert!(http_check(port, "/healthz", Duration::from_secs(1)));
        server.join().unwrap();
    }

    #[test]
    fn a_tcp_check_of_a_port_nobody_listens_on_fails() {
        // Bound but not listening: refused, and no other test can take the port meanwhile.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        assert!(!tcp_check(port, Duration::from_millis(200)));
        assert!(!http_check(port, "/healthz", Duration::from_millis(200)));
    }
}

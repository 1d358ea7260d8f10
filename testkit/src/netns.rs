//! Network namespaces for tests that put each tier of a fleet on a host of
//! its own (`ip netns`, veth pairs): a link between two of them can be cut
//! with `ip link set DEV down`, as a WAN goes. Needs root and iproute2.

use std::process::Command;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("cannot run ip (apt-get install iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A network namespace with loopback up, deleted (with its veth ends) when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `name` must be unique on the machine: put the test's pid in it.
    pub fn new(name: &str) -> Self {
        crate::agent::require_root();
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Self { name: name.to_string() }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A veth pair: `a` in namespace `a_ns` (none: the test's own) with address
/// `a_ip` (CIDR), `b` likewise. Interface names are at most 15 bytes.
pub struct Veth {
    a: String,
    a_ns: Option<String>,
}

impl Veth {
    pub fn new(a: &str, a_ns: Option<&Netns>, a_ip: &str, b: &str, b_ns: &Netns, b_ip: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", a]).output();
        ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        if let Some(ns) = a_ns {
            ip(&["link", "set", a, "netns", &ns.name]);
        }
        ip(&["link", "set", b, "netns", &b_ns.name]);
        let on = |ns: Option<&Netns>| ns.map(|n| vec!["-n".to_string(), n.name.clone()]).unwrap_or_default();
        for (ns, dev, addr) in [(a_ns, a, a_ip), (Some(b_ns), b, b_ip)] {
            let mut args = on(ns);
            args.extend(["addr", "add", addr, "dev", dev].map(String::from));
            ip(&args.iter().map(String::as_str).collect::<Vec<_>>());
            let mut args = on(ns);
            args.extend(["link", "set", dev, "up"].map(String::from));
            ip(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
        Self { a: a.to_string(), a_ns: a_ns.map(|n| n.name.clone()) }
    }

    /// Takes the link down (`ip link set A down`) or up again.
    pub fn set_up(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        match &self.a_ns {
            Some(ns) => ip(&["-n", ns, "link", "set", &self.a, state]),
            None => ip(&["link", "set", &self.a, state]),
        }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        if self.a_ns.is_none() {
            let _ = Command::new("ip").args(["link", "del", &self.a]).output();
        }
    }
}

//! A real OCI distribution registry for tests: Debian's `docker-registry` on
//! 127.0.0.1 with a free port and its own storage, filled with `skopeo`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;

const REGISTRY: &str = "/usr/bin/docker-registry";
const STARTUP: Duration = Duration::from_secs(15);

/// Fails loudly, with the fix, when an outside tool is missing.
pub fn require_tool(binary: &str, package: &str) -> anyhow::Result<()> {
    let found = binary.contains('/') && Path::new(binary).is_file()
        || std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()));
    if !found {
        bail!("needs {binary}: apt-get install {package}");
    }
    Ok(())
}

/// A running registry; killed when dropped.
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Registry {
    /// Starts a registry and waits until `/v2/` answers.
    pub fn start() -> anyhow::Result<Self> {
        require_tool(REGISTRY, "docker-registry")?;
        let dir = tempfile::Builder::new().prefix("outpost-registry-").tempdir()?;
        // A port that was free a moment ago; the registry binds it right after.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                dir.path().join("storage").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {REGISTRY}"))?;
        let mut registry = Self { child, addr, dir };
        registry.wait_ready()?;
        Ok(registry)
    }

    /// `127.0.0.1:PORT`, as image references and `insecure_registries` name it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Pushes the image tagged `name_tag` in the OCI layout at `layout` to
    /// `HOST/name_tag`; a multi-platform index is pushed whole.
    pub fn push(&self, layout: &Path, name_tag: &str) -> anyhow::Result<()> {
        require_tool("skopeo", "skopeo")?;
        let out = Command::new("skopeo")
            // `--all`: without it skopeo copies only this machine's image out of an index.
            .args(["copy", "--all", "--quiet", "--insecure-policy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{name_tag}", layout.display()))
            .arg(format!("docker://{}/{name_tag}", self.host()))
            .output()
            .context("cannot run skopeo")?;
        if !out.status.success() {
            bail!("skopeo could not push {name_tag}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("{REGISTRY} exited ({status}) at start: {}", self.log());
            }
            if self.answers() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{REGISTRY} did not answer on {} within {STARTUP:?}: {}", self.addr, self.log())
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
        let request = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let mut response = String::new();
        stream.set_read_timeout(Some(Duration::from_secs(1))).is_ok()
            && stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut response).is_ok()
            && response.split(' ').nth(1) == Some("200")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

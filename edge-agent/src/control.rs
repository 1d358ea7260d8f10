//! The local control socket: how `edge-agent apply` and `events` reach a
//! running daemon (the store is the daemon's alone while it runs). One JSON
//! request per line, one JSON response per line, root only (the socket is 0600).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_proto::{DesiredState, Event};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    Apply(DesiredState),
    Events {
        after: u64,
    },
    /// Update the agent to `target` from the hub, then restart into it.
    Update {
        target: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    /// Stored and flushed; `changed` is false when this generation was already there.
    Applied {
        generation: u64,
        changed: bool,
    },
    Events(Vec<Event>),
    /// Installed in `slot`; the agent restarts into it right after answering.
    Updating {
        target: String,
        version: String,
        slot: String,
    },
    Error(String),
}

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("agent.sock")
}

/// Sends one request to the daemon. `Ok(None)` when no daemon listens.
pub fn call(run_dir: &Path, request: &Request) -> std::io::Result<Option<Response>> {
    let mut stream = match UnixStream::connect(socket_path(run_dir)) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    // Applying may pull nothing and start nothing: storing is quick. Still, a
    // hung daemon must not hang the operator's shell.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map(Some).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the daemon answered {answer:?}: {e}"))
    })
}

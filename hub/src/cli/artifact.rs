//! `hub artifact push FILE`, `hub artifact ls`: update bundles in the hub's
//! site cache, by sha256; and `hub tuf push DIR`: the signed metadata that
//! names them.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ota::Digest;

use super::client::ApiClient;
use crate::artifacts::tuf_role;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Upload a file (an update bundle) to the hub, which serves it as
    /// /v1/artifacts/sha256:... and never evicts it.
    Push { file: PathBuf },
    /// List what the hub's cache holds.
    Ls {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand)]
pub enum TufCommand {
    /// Upload the TUF metadata in DIR (root.json, N.root.json, targets.json,
    /// snapshot.json, timestamp.json, as the `ota` tool signed them).
    Push { dir: PathBuf },
}

pub async fn run(client: &ApiClient, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Push { file } => push(client, &file).await,
        Command::Ls { json } => list(client, json).await,
    }
}

async fn push(client: &ApiClient, path: &Path) -> anyhow::Result<()> {
    let (digest, len) = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || hash_file(&path)).await??
    };
    let file = tokio::fs::File::open(path).await.with_context(|| format!("cannot open {path:?}"))?;
    client.push_artifact(&digest, file, len).await?;
    println!("{digest} {len} bytes: {}", path.display());
    Ok(())
}

fn hash_file(path: &Path) -> anyhow::Result<(Digest, u64)> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {path:?}"))?;
    let mut reader = ota::HashingReader::new(file);
    std::io::copy(&mut reader, &mut std::io::sink()).with_context(|| format!("cannot read {path:?}"))?;
    Ok(reader.finish())
}

async fn list(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let blobs = client.artifacts().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&blobs)?);
        return Ok(());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let ago = |at: u64| humantime::format_duration(Duration::from_secs(now.saturating_sub(at) / 1000)).to_string();
    let rows: Vec<Vec<String>> = blobs
        .iter()
        .map(|b| {
            let kept = if b.pinned { "pushed" } else { "cached" };
            vec![b.digest.clone(), b.size.to_string(), format!("{} ago", ago(b.last_used)), kept.to_string()]
        })
        .collect();
    print!("{}", super::table(&["DIGEST", "BYTES", "LAST USED", "KEPT"], &rows));
    Ok(())
}

pub async fn run_tuf(client: &ApiClient, command: TufCommand) -> anyhow::Result<()> {
    let TufCommand::Push { dir } = command;
    let files = tuf_files(&dir)?;
    if files.is_empty() {
        anyhow::bail!(
            "{dir:?} holds no TUF metadata (root.json, N.root.json, targets.json, snapshot.json, timestamp.json)"
        );
    }
    for (name, path) in files {
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {path:?}"))?;
        client.put_tuf(&name, bytes).await.with_context(|| format!("cannot push {name}"))?;
        println!("pushed {name}");
    }
    Ok(())
}

/// The metadata files of `dir`, in the order a client may see them change
/// safely: roots first, then targets, snapshot, and timestamp last, so a new
/// timestamp never names a snapshot the hub does not serve yet.
fn tuf_files(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {dir:?}"))? {
        let entry = entry.with_context(|| format!("cannot list {dir:?}"))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if name.strip_suffix(".json").is_some_and(tuf_role) {
            files.push((name, entry.path()));
        }
    }
    let rank = |name: &str| match name {
        "root.json" => (1, 0),
        "targets.json" => (2, 0),
        "snapshot.json" => (3, 0),
        "timestamp.json" => (4, 0),
        numbered => (0, numbered.split('.').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)),
    };
    files.sort_by_key(|(name, _)| rank(name));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuf_files_go_up_roots_first_and_timestamp_last() {
        let dir = tempfile::tempdir().unwrap();
        for name in
            ["timestamp.json", "targets.json", "10.root.json", "root.json", "2.root.json", "snapshot.json", "notes.txt"]
        {
            std::fs::write(dir.path().join(name), "{}").unwrap();
        }
        let names: Vec<String> = tuf_files(dir.path()).unwrap().into_iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            ["2.root.json", "10.root.json", "root.json", "targets.json", "snapshot.json", "timestamp.json"]
        );
    }
}

//! `ota`: make keys, sign metadata, verify it against a root, and inspect it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

use ota::metadata::{Signed, Snapshot, Targets, Timestamp};
use ota::verify::verify_role;
use ota::{SigningKey, TrustedState, Versions};

#[derive(Parser)]
#[command(about = "Keys and signed update metadata for Outpost devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a new Ed25519 key (PKCS#8 DER) and prints its key id.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Adds KEY's signature over the canonical `signed` object of FILE.
    Sign {
        #[arg(long)]
        key: PathBuf,
        file: PathBuf,
    },
    /// Checks FILE's signatures and expiry as ROLE against the trusted ROOT.
    Verify {
        #[arg(long)]
        root: PathBuf,
        #[arg(long, value_enum)]
        role: CliRole,
        file: PathBuf,
    },
    /// Prints a summary of a metadata file.
    Inspect { file: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum CliRole {
    Root,
    Targets,
    Snapshot,
    Timestamp,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Keygen { out } => {
            if out.exists() {
                bail!("{} already exists; refusing to overwrite a key", out.display());
            }
            let (key, pkcs8) = SigningKey::generate()?;
            fs::write(&out, pkcs8).with_context(|| format!("failed to write {}", out.display()))?;
            println!("{}", key.public_key().key_id());
        }
        Command::Sign { key, file } => {
            let key =
                SigningKey::from_pkcs8(&read(&key)?).with_context(|| format!("failed to load {}", key.display()))?;
            let mut signed: Signed<Value> =
                serde_json::from_slice(&read(&file)?).with_context(|| format!("{} is not metadata", file.display()))?;
            signed.sign(&key)?;
            fs::write(&file, signed.to_json()?).with_context(|| format!("failed to write {}", file.display()))?;
        }
        Command::Verify { root, role, file } => {
            let state = TrustedState::new(&read(&root)?, Versions::default())
                .with_context(|| format!("{} is not a trusted root", root.display()))?;
            let (bytes, now) = (read(&file)?, SystemTime::now());
            let version = match role {
                CliRole::Root => TrustedState::new(&bytes, Versions::default())?.root().version,
                CliRole::Targets => verify_role::<Targets>(&bytes, state.root(), now, 0)?.version,
                CliRole::Snapshot => verify_role::<Snapshot>(&bytes, state.root(), now, 0)?.version,
                CliRole::Timestamp => verify_role::<Timestamp>(&bytes, state.root(), now, 0)?.version,
            };
            println!("{}: valid, version {version}", file.display());
        }
        Command::Inspect { file } => {
            let signed: Signed<Value> =
                serde_json::from_slice(&read(&file)?).with_context(|| format!("{} is not metadata", file.display()))?;
            let field = |name: &str| signed.signed.get(name).map(Value::to_string).unwrap_or_else(|| "-".into());
            println!("type:     {}", field("_type"));
            println!("version:  {}", field("version"));
            println!("expires:  {}", field("expires"));
            for entries in ["targets", "meta"] {
                if let Some(Value::Object(map)) = signed.signed.get(entries) {
                    for (name, entry) in map {
                        println!("{entries}:  {name} {entry}");
                    }
                }
            }
            for signature in &signed.signatures {
                println!("signed by {}", signature.keyid);
            }
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("failed to read {}", path.display()))
}

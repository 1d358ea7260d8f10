//! `ota`: make keys, sign metadata, verify it against a root, and inspect it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

use ota::metadata::{Key, KeyType, RoleKeys, RoleType, Root, Signed, Snapshot, Targets, Timestamp};
use ota::verify::verify_role;
use ota::{sign_desired, verify_desired, SigningKey, TrustedState, Versions};
use outpost_proto::DesiredState;

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
    /// Writes a new version-1 root signed by the root key. Each role has one
    /// key and threshold 1; the update roles default to the root key, which
    /// suits a trial, not a fleet (give each its own key, kept offline).
    NewRoot {
        #[arg(long)]
        root_key: PathBuf,
        /// The operator's key for deployments (`hub apply --key`).
        #[arg(long)]
        deployments_key: PathBuf,
        #[arg(long)]
        targets_key: Option<PathBuf>,
        #[arg(long)]
        snapshot_key: Option<PathBuf>,
        #[arg(long)]
        timestamp_key: Option<PathBuf>,
        /// How long the root is valid, e.g. `365d`.
        #[arg(long, default_value = "365d")]
        expires: humantime::Duration,
        #[arg(long)]
        out: PathBuf,
    },
    /// Signs every deployment of a desired-state document (TOML or JSON) with
    /// a deployments key and writes it as JSON, for `edge-agent apply -f` or
    /// `hub set-desired -f`. Sign a signed document again to add a key.
    SignDesired {
        #[arg(long)]
        key: PathBuf,
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Checks every deployment of a desired-state document against ROOT, as a device does.
    VerifyDesired {
        #[arg(long)]
        root: PathBuf,
        file: PathBuf,
    },
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
            // Readable by its owner only: it is a private key.
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("failed to create {}", out.display()))?;
            file.write_all(&pkcs8).with_context(|| format!("failed to write {}", out.display()))?;
            println!("{}", key.public_key().key_id());
        }
        Command::Sign { key, file } => {
            let key = load_key(&key)?;
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
        Command::NewRoot { root_key, deployments_key, targets_key, snapshot_key, timestamp_key, expires, out } => {
            let or_root = |key: &Option<PathBuf>| key.clone().unwrap_or_else(|| root_key.clone());
            let (targets, snapshot, timestamp) =
                (or_root(&targets_key), or_root(&snapshot_key), or_root(&timestamp_key));
            let keys = [
                (RoleType::Root, root_key.as_path()),
                (RoleType::Targets, targets.as_path()),
                (RoleType::Snapshot, snapshot.as_path()),
                (RoleType::Timestamp, timestamp.as_path()),
                (RoleType::Deployments, deployments_key.as_path()),
            ];
            new_root(keys, expires.into(), &out)?;
            println!("{}: root version 1", out.display());
        }
        Command::SignDesired { key, file, out } => {
            let key = load_key(&key)?;
            let mut state = read_desired(&file)?;
            sign_desired(&mut state, &key).with_context(|| format!("cannot sign {}", file.display()))?;
            let json = serde_json::to_vec_pretty(&state)?;
            fs::write(&out, json).with_context(|| format!("failed to write {}", out.display()))?;
            println!(
                "{}: {} deployment(s) signed by {}",
                out.display(),
                state.deployments.len(),
                key.public_key().key_id()
            );
        }
        Command::VerifyDesired { root, file } => {
            let state = TrustedState::new(&read(&root)?, Versions::default())
                .with_context(|| format!("{} is not a trusted root", root.display()))?;
            let desired = read_desired(&file)?;
            verify_desired(&desired, state.root()).with_context(|| format!("{} was refused", file.display()))?;
            println!("{}: every deployment is validly signed", file.display());
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

fn new_root(keys: [(RoleType, &Path); 5], expires: Duration, out: &Path) -> Result<()> {
    if out.exists() {
        bail!("{} already exists; refusing to overwrite a root", out.display());
    }
    let mut root = Root {
        kind: RoleType::Root,
        version: 1,
        expires: SystemTime::now() + expires,
        keys: BTreeMap::new(),
        roles: BTreeMap::new(),
    };
    let mut root_key = None;
    for (role, path) in keys {
        let key = load_key(path)?;
        let public = key.public_key();
        root.keys.insert(public.key_id(), Key { keytype: KeyType::Ed25519, public: public.to_hex() });
        root.roles.insert(role, RoleKeys { keyids: vec![public.key_id()], threshold: 1 });
        if role == RoleType::Root {
            root_key = Some(key);
        }
    }
    let mut signed = Signed::new(root);
    signed.sign(&root_key.context("a root key is required")?)?;
    fs::write(out, signed.to_json()?).with_context(|| format!("failed to write {}", out.display()))?;
    Ok(())
}

fn load_key(path: &Path) -> Result<SigningKey> {
    SigningKey::from_pkcs8(&read(path)?).with_context(|| format!("failed to load {}", path.display()))
}

fn read_desired(path: &Path) -> Result<DesiredState> {
    let text = fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    DesiredState::parse(&text).with_context(|| format!("{} is not a valid desired state", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("failed to read {}", path.display()))
}

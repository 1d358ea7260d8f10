//! Fleet deployments: `hub apply -f FILE`, `hub deployments`, and
//! `hub deployment show|delete|history NAME`.

use std::path::PathBuf;

use anyhow::Context;
use outpost_proto::fleet::{DeploymentSpec, DeploymentStatus, RolloutState};

use reqwest::StatusCode;

use super::client::{ApiClient, ClientError};
use crate::rollout::{self, pin, pin::Registries};

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The deployment: TOML, YAML (.yaml, .yml) or JSON (.json).
    #[arg(short, long)]
    file: PathBuf,
    /// Sign the deployment with this operator deployments key (PKCS#8 DER,
    /// `ota keygen`), here: the key never goes to the hub. Repeat for a
    /// threshold of several keys. Images are pinned by digest first.
    #[arg(long)]
    key: Vec<PathBuf>,
    /// A registry (`host:port`) to ask over plain HTTP when pinning images
    /// before signing, as the hub's `insecure-registries`.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// A deployment, its rollout by wave, and its conflicts.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove it: its workloads go from every device.
    Delete { name: String },
    /// Its revisions, oldest first.
    History { name: String },
}

pub fn read(path: &std::path::Path) -> anyhow::Result<DeploymentSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    let spec = match extension {
        "yaml" | "yml" => serde_norway::from_str(&text).map_err(anyhow::Error::from),
        "json" => serde_json::from_str(&text).map_err(anyhow::Error::from),
        _ => toml::from_str(&text).map_err(anyhow::Error::from),
    };
    let spec: DeploymentSpec = spec.with_context(|| format!("{} is not a deployment", path.display()))?;
    spec.validate().with_context(|| format!("{} is not a valid deployment", path.display()))?;
    Ok(spec)
}

pub async fn apply(client: &ApiClient, args: ApplyArgs) -> anyhow::Result<()> {
    let spec = read(&args.file)?;
    let before = match client.deployment(&spec.name).await {
        Ok(status) => Some(status.revision),
        Err(ClientError::Api { status: StatusCode::NOT_FOUND, .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let status =
        if args.key.is_empty() { client.apply(&spec).await? } else { apply_signed(client, spec, &args).await? };
    let rollout = &status.rollout;
    if before == Some(status.revision) {
        println!("{}: unchanged, revision {} ({})", status.name, status.revision, state(rollout.state));
    } else {
        println!(
            "{}: revision {}, rolling out to {} devices in {} waves (`hub rollout watch {}`)",
            status.name,
            status.revision,
            rollout.counts.targeted,
            rollout.waves.len(),
            status.name
        );
    }
    Ok(())
}

/// Pins the images, signs the deployment as the revision the hub will give
/// it (the newest again when the spec is the newest's, else the next), and
/// sends spec and signatures.
async fn apply_signed(
    client: &ApiClient,
    mut spec: DeploymentSpec,
    args: &ApplyArgs,
) -> anyhow::Result<DeploymentStatus> {
    let keys = args.key.iter().map(|path| super::set_desired::load_key(path)).collect::<anyhow::Result<Vec<_>>>()?;
    let registries = Registries { insecure: args.insecure_registries.clone() };
    pin::pin_images(&mut spec, &registries).await.with_context(|| format!("cannot pin the images of {}", spec.name))?;
    let revisions = match client.revisions(&spec.name).await {
        Ok(revisions) => revisions,
        Err(ClientError::Api { status: StatusCode::NOT_FOUND, .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let revision = match revisions.last() {
        Some(newest) if newest.spec == spec => newest.revision,
        Some(newest) => newest.revision + 1,
        None => 1,
    };
    let mut deployment = rollout::deployment(&spec, revision, Vec::new());
    for key in &keys {
        ota::sign_deployment(&mut deployment, key)
            .with_context(|| format!("cannot sign {} revision {revision}", spec.name))?;
    }
    Ok(client.apply_signed(&spec, revision, &deployment.signatures).await?)
}

pub async fn list(client: &ApiClient, args: ListArgs) -> anyhow::Result<()> {
    let deployments = client.deployments().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&deployments)?);
        return Ok(());
    }
    let header = ["NAME", "REVISION", "ROLLOUT", "TARGETED", "UPDATED", "HEALTHY", "FAILED", "PENDING", "OFFLINE"];
    let rows: Vec<Vec<String>> = deployments.iter().map(row).collect();
    print!("{}", super::table(&header, &rows));
    Ok(())
}

fn row(d: &DeploymentStatus) -> Vec<String> {
    let r = &d.rollout;
    let c = &r.counts;
    let rollout = match r.state {
        RolloutState::Progressing => format!("rev {} wave {}/{}", r.revision, r.wave + 1, r.waves.len()),
        other => format!("rev {} {}", r.revision, state(other)),
    };
    [d.name.clone(), d.revision.to_string(), rollout]
        .into_iter()
        .chain([c.targeted, c.updated, c.healthy, c.failed, c.pending, c.offline].map(|n| n.to_string()))
        .collect()
}

pub fn state(state: RolloutState) -> &'static str {
    match state {
        RolloutState::Progressing => "progressing",
        RolloutState::Paused => "paused",
        RolloutState::Complete => "complete",
        RolloutState::RolledBack => "rolled back",
        RolloutState::Aborted => "aborted",
    }
}

pub async fn run(client: &ApiClient, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Show { name, json } => {
            let status = client.deployment(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", show(&status));
            }
        }
        Command::Delete { name } => {
            client.delete_deployment(&name).await?;
            println!("deleted {name}: its workloads go from every device");
        }
        Command::History { name } => {
            for revision in client.revisions(&name).await? {
                let mut what: Vec<String> =
                    revision.spec.workloads.iter().map(|w| format!("{}={}", w.name, w.image)).collect();
                what.extend(revision.spec.update.iter().map(|u| format!("agent={} ({})", u.target, u.version)));
                println!("revision {}  {}", revision.revision, what.join(" "));
            }
        }
    }
    Ok(())
}

fn show(d: &DeploymentStatus) -> String {
    let r = &d.rollout;
    let c = &r.counts;
    let mut out = format!("{} revision {} (priority {})\n", d.name, d.revision, d.spec.priority);
    let selector: Vec<String> = d.spec.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out += &format!("selector: {}\n", if selector.is_empty() { "every device".into() } else { selector.join(",") });
    let previous = r.previous.map_or("none".to_string(), |p| p.to_string());
    out += &format!("rollout of revision {} (previous {previous}): {}\n", r.revision, state(r.state));
    if let Some(reason) = &r.reason {
        out += &format!("  {reason}\n");
    }
    for (i, wave) in r.waves.iter().enumerate() {
        let mark = if wave.done {
            "done"
        } else if i == r.wave {
            "in progress"
        } else {
            ""
        };
        out += &format!("  wave {} ({}): {} devices {mark}\n", i + 1, wave.wave, wave.devices);
    }
    out += &format!(
        "devices: {} targeted, {} updated, {} healthy, {} failed, {} pending, {} offline\n",
        c.targeted, c.updated, c.healthy, c.failed, c.pending, c.offline
    );
    for conflict in &d.conflicts {
        out += &format!(
            "conflict on {}: workload {} runs from {}, not {}\n",
            conflict.device, conflict.workload, conflict.winner, conflict.loser
        );
    }
    out
}

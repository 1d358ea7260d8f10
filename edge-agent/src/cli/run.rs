use std::path::PathBuf;

use anyhow::Context;
use outpost_proto::WorkloadSpec;

use crate::runtime::image::PullOptions;
use crate::runtime::supervisor::require_root;
use crate::runtime::{RuntimeError, Supervisor};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The workload spec (TOML, or JSON); see docs/workload-spec.md.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
}

pub fn run(supervisor: &Supervisor, pulls: &PullOptions, args: RunArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let spec =
        WorkloadSpec::parse(&text).with_context(|| format!("{} is not a valid workload spec", args.file.display()))?;
    require_root()?;
    let image = super::pull::ensure_image(supervisor, pulls, &spec.image)?;
    if let Ok(existing) = supervisor.resolve(&spec.name) {
        return Err(RuntimeError::AlreadyExists(existing).into());
    }
    let instance = supervisor.create(&spec, &image, None)?;
    let pid = match supervisor.start(&instance) {
        Ok(pid) => pid,
        Err(e) => {
            // Leave nothing half-made behind a failed first start.
            let _ = supervisor.remove(&instance);
            return Err(e.into());
        }
    };
    println!("{}: running (pid {pid}, image {})", spec.name, image.digest);
    Ok(())
}

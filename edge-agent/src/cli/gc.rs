use std::path::Path;

use anyhow::Context;

use crate::runtime::image::{GcReport, ImageStore};
use crate::runtime::Paths;

#[derive(clap::Args)]
pub struct GcArgs {
    /// Print the report as JSON, for scripts.
    #[arg(long)]
    json: bool,
}

pub fn run(paths: &Paths, args: GcArgs) -> anyhow::Result<()> {
    let report = collect(paths)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Removes the images no workload on this device uses.
pub(crate) fn collect(paths: &Paths) -> anyhow::Result<GcReport> {
    let store = ImageStore::open(&paths.images())?;
    let in_use = images_in_use(&paths.workloads())?;
    Ok(store.gc(&in_use)?)
}

pub(crate) fn print_report(report: &GcReport) {
    for reference in &report.images_removed {
        println!("removed {reference}");
    }
    println!(
        "freed {:.1} MiB: {} images, {} blobs, {} unpacked layers, {} leftovers",
        report.bytes_freed as f64 / (1 << 20) as f64,
        report.images_removed.len(),
        report.blobs_removed,
        report.layers_removed,
        report.temporaries_removed
    );
}

/// The `image_digest` of every `<workloads>/*/workload.json`; no workloads
/// directory means none.
fn images_in_use(workloads: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(workloads) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", workloads.display())),
    };
    let mut digests = Vec::new();
    for entry in entries {
        let record =
            entry.with_context(|| format!("cannot list {}", workloads.display()))?.path().join("workload.json");
        let bytes = match std::fs::read(&record) {
            Ok(bytes) => bytes,
            // A workload directory without its record is a create that crashed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", record.display())),
        };
        // Refusing to collect beats deleting the image of a workload we failed to read.
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not JSON: fix or remove that workload before gc", record.display()))?;
        if let Some(digest) = value.get("image_digest").and_then(|d| d.as_str()) {
            digests.push(digest.to_string());
        }
    }
    Ok(digests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_in_use_are_the_digests_recorded_by_workloads() {
        let dir = tempfile::tempdir().unwrap();
        for (name, record) in [("a", r#"{"image_digest":"sha256:aa"}"#), ("b", r#"{"image_digest":"sha256:bb","x":1}"#)]
        {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("workload.json"), record).unwrap();
        }
        std::fs::create_dir(dir.path().join("crashed-create")).unwrap();
        let mut digests = images_in_use(dir.path()).unwrap();
        digests.sort();
        assert_eq!(digests, ["sha256:aa", "sha256:bb"]);
    }

    #[test]
    fn no_workloads_directory_means_no_images_in_use() {
        let dir = tempfile::tempdir().unwrap();
        assert!(images_in_use(&dir.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_workload_record_stops_gc() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a").join("workload.json"), "{oops").unwrap();
        assert!(images_in_use(dir.path()).is_err());
    }
}

use crate::runtime::image::ImageStore;
use crate::runtime::Paths;

#[derive(clap::Args)]
pub struct ImagesArgs {
    /// One JSON array, for scripts.
    #[arg(long)]
    json: bool,
}

pub fn run(paths: &Paths, args: ImagesArgs) -> anyhow::Result<()> {
    let images = ImageStore::open(&paths.images())?.list()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(());
    }
    println!("{:<50} {:<19} {:>6} {:>10}", "REFERENCE", "DIGEST", "LAYERS", "SIZE");
    for image in images {
        let short = &image.digest[..image.digest.len().min("sha256:".len() + 12)];
        let size = format!("{:.1} MiB", image.size as f64 / (1 << 20) as f64);
        println!("{:<50} {:<19} {:>6} {:>10}", image.reference, short, image.layers.len(), size);
    }
    Ok(())
}

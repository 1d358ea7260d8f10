use std::path::PathBuf;

use crate::runtime::image::ImageStore;
use crate::runtime::Paths;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// An OCI image layout directory, or an OCI archive (`skopeo copy ... oci-archive:FILE:name:tag`).
    path: PathBuf,
}

pub fn run(paths: &Paths, args: ImportArgs) -> anyhow::Result<()> {
    let store = ImageStore::open(&paths.images())?;
    let images = match store.import(&args.path) {
        Err(e) if e.is_no_space() => {
            super::pull::make_room(paths, &e)?;
            store.import(&args.path)?
        }
        other => other?,
    };
    for image in images {
        println!("imported {} ({}, {} layers)", image.reference, image.digest, image.layers.len());
    }
    Ok(())
}

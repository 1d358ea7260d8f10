//! Ready-made extra layers for `image::build_oci_layout`: a big incompressible
//! file (for download and resume tests) and OCI whiteouts (for unpack tests).

use ring::rand::{SecureRandom, SystemRandom};

use crate::image::Layer;

/// A layer holding one file of `size` random bytes at `path`: gzip cannot
/// shrink it, so pulling it moves about `size` bytes.
pub fn random_file(path: &str, size: usize) -> anyhow::Result<Layer> {
    let mut data = vec![0u8; size];
    let rng = SystemRandom::new();
    for chunk in data.chunks_mut(1 << 16) {
        rng.fill(chunk).map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    }
    tar_of(&[(path.to_string(), &data)])
}

/// A layer that deletes each of `paths` from the layers below (`.wh.NAME`).
pub fn whiteouts(paths: &[&str]) -> anyhow::Result<Layer> {
    let entries: Vec<(String, &[u8])> = paths.iter().map(|p| (whiteout_name(p), &b""[..])).collect();
    tar_of(&entries)
}

/// A layer that hides everything the layers below have in `dir`
/// (`.wh..wh..opq`), then puts `files` (name, content) in it.
pub fn opaque_dir(dir: &str, files: &[(&str, &[u8])]) -> anyhow::Result<Layer> {
    let dir = dir.trim_matches('/');
    let mut entries: Vec<(String, &[u8])> = vec![(format!("{dir}/.wh..wh..opq"), b"")];
    entries.extend(files.iter().map(|(name, data)| (format!("{dir}/{name}"), *data)));
    tar_of(&entries)
}

/// `a/b` -> `a/.wh.b`.
fn whiteout_name(path: &str) -> String {
    match path.trim_matches('/').rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/.wh.{name}"),
        None => format!(".wh.{}", path.trim_matches('/')),
    }
}

fn tar_of(entries: &[(String, &[u8])]) -> anyhow::Result<Layer> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, path, *data)?;
    }
    Ok(Layer::Tar(builder.into_inner()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteout_names_follow_the_oci_convention() {
        assert_eq!(whiteout_name("etc/motd"), "etc/.wh.motd");
        assert_eq!(whiteout_name("/motd"), ".wh.motd");
    }
}

//! The local index: image reference -> manifest digest, one small JSON file
//! replaced atomically.

use std::collections::BTreeMap;
use std::path::Path;

use oci_client::Reference;
use serde::{Deserialize, Serialize};

use super::error::IoContext;
use super::ImageError;
use crate::runtime::paths::write_atomic;

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Index {
    /// Normalized reference -> `sha256:...` manifest digest.
    pub images: BTreeMap<String, String>,
}

impl Index {
    /// An absent file is an empty index (a fresh store).
    pub fn load(path: &Path) -> Result<Self, ImageError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ImageError::CorruptStore {
                path: path.to_path_buf(),
                detail: format!("unreadable index ({e}); move it away and pull the images again"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ImageError::io(path, e)),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(self).expect("a map of strings serializes");
        write_atomic(path, &bytes).at(path)
    }

    /// References that point at `digest`, sorted.
    pub fn references_of<'a>(&'a self, digest: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.images.iter().filter(move |(_, d)| *d == digest).map(|(r, _)| r)
    }
}

/// The canonical form of a reference, so `busybox`, `busybox:latest` and
/// `docker.io/library/busybox:latest` name the same entry.
pub(crate) fn normalize(reference: &str) -> Result<String, ImageError> {
    parse_reference(reference).map(|r| r.whole())
}

pub(crate) fn parse_reference(reference: &str) -> Result<Reference, ImageError> {
    super::reference::parse(reference)
        .map_err(|e| ImageError::InvalidReference { reference: reference.to_string(), detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_forms_of_a_reference_normalize_alike() {
        let long = normalize("docker.io/library/busybox:latest").unwrap();
        assert_eq!(normalize("busybox").unwrap(), long);
        assert_eq!(normalize("busybox:latest").unwrap(), long);
        assert_eq!(normalize("127.0.0.1:5000/app:1").unwrap(), "127.0.0.1:5000/app:1");
    }

    #[test]
    fn an_invalid_reference_is_refused_naming_it() {
        let err = normalize("busybox:no spaces").unwrap_err();
        assert!(err.to_string().contains("busybox:no spaces"), "{err}");
    }

    #[test]
    fn index_round_trips_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        assert_eq!(Index::load(&path).unwrap(), Index::default());
        let mut index = Index::default();
        index.images.insert("a:1".into(), "sha256:x".into());
        index.images.insert("b:1".into(), "sha256:x".into());
        index.save(&path).unwrap();
        let loaded = Index::load(&path).unwrap();
        assert_eq!(loaded, index);
        assert_eq!(loaded.references_of("sha256:x").collect::<Vec<_>>(), ["a:1", "b:1"]);
    }

    #[test]
    fn a_garbled_index_is_reported_as_a_damaged_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(Index::load(&path), Err(ImageError::CorruptStore { .. })));
    }
}

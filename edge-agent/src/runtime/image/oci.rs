//! Reading OCI (and Docker v2) manifests, indexes and configs: which media
//! types we accept, which platform we pick, what the config says.

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os};
use ota::Digest;
use serde::Deserialize;

use super::{ImageConfig, ImageError};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_FOREIGN_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A manifest is either one image or an index of per-platform images.
pub(crate) enum Manifest {
    Image(Box<ImageManifest>),
    Index(Box<ImageIndex>),
}

/// Only the fields that tell an index from an image manifest.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
}

pub(crate) fn parse_manifest(bytes: &[u8], what: &str) -> Result<Manifest, ImageError> {
    let malformed = |detail: String| ImageError::MalformedImage { what: what.to_string(), detail };
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    let is_index = match probe.media_type.as_deref() {
        Some("application/vnd.oci.image.index.v1+json") | Some(DOCKER_MANIFEST_LIST) => true,
        Some("application/vnd.oci.image.manifest.v1+json") | Some(DOCKER_MANIFEST) => false,
        Some(other) => {
            return Err(ImageError::UnsupportedMediaType { what: what.to_string(), media_type: other.to_string() })
        }
        None => probe.manifests.is_some(),
    };
    if is_index {
        let index = ImageIndex::from_reader(bytes).map_err(|e| malformed(e.to_string()))?;
        Ok(Manifest::Index(Box::new(index)))
    } else {
        let manifest = ImageManifest::from_reader(bytes).map_err(|e| malformed(e.to_string()))?;
        check_media_types(&manifest, what)?;
        Ok(Manifest::Image(Box::new(manifest)))
    }
}

/// Refuses an image whose config or layers we could not use, before anything
/// is downloaded.
fn check_media_types(manifest: &ImageManifest, what: &str) -> Result<(), ImageError> {
    match manifest.config().media_type() {
        MediaType::ImageConfig => {}
        MediaType::Other(t) if t == DOCKER_CONFIG => {}
        other => {
            return Err(ImageError::UnsupportedMediaType {
                what: format!("the config of {what}"),
                media_type: other.to_string(),
            })
        }
    }
    for layer in manifest.layers() {
        layer_compression(layer)?;
    }
    if manifest.layers().is_empty() {
        return Err(ImageError::MalformedImage { what: what.to_string(), detail: "it has no layers".to_string() });
    }
    Ok(())
}

pub(crate) fn layer_compression(layer: &Descriptor) -> Result<Compression, ImageError> {
    match layer.media_type() {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Ok(Compression::None),
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => Ok(Compression::Gzip),
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => Ok(Compression::Zstd),
        MediaType::Other(t) if t == DOCKER_LAYER_GZIP || t == DOCKER_FOREIGN_LAYER_GZIP => Ok(Compression::Gzip),
        MediaType::Other(t) if t == DOCKER_LAYER_TAR => Ok(Compression::None),
        other => Err(ImageError::UnsupportedMediaType {
            what: format!("layer {}", layer.digest()),
            media_type: other.to_string(),
        }),
    }
}

/// The digest of a descriptor, as our sha256-only type.
pub(crate) fn descriptor_digest(desc: &Descriptor) -> Result<Digest, ImageError> {
    parse_digest(desc.digest().as_ref())
}

pub(crate) fn parse_digest(s: &str) -> Result<Digest, ImageError> {
    s.parse().map_err(|e: ota::DigestParseError| ImageError::MalformedImage {
        what: format!("digest {s}"),
        detail: e.to_string(),
    })
}

/// The entry of an index for this machine's OS and architecture.
pub(crate) fn select_platform<'a>(index: &'a ImageIndex, reference: &str) -> Result<&'a Descriptor, ImageError> {
    let (os, arch) = (Os::default(), Arch::default());
    index
        .manifests()
        .iter()
        .find(|m| m.platform().as_ref().is_some_and(|p| *p.os() == os && *p.architecture() == arch))
        .ok_or_else(|| ImageError::NoMatchingPlatform { reference: reference.to_string(), platform: this_platform() })
}

pub(crate) fn this_platform() -> String {
    format!("{}/{}", Os::default(), Arch::default())
}

pub(crate) fn parse_config(bytes: &[u8], what: &str) -> Result<ImageConfiguration, ImageError> {
    ImageConfiguration::from_reader(bytes)
        .map_err(|e| ImageError::MalformedImage { what: what.to_string(), detail: e.to_string() })
}

/// Diff-ids of the layers, lowest first; one per layer of the manifest.
pub(crate) fn diff_ids(
    config: &ImageConfiguration,
    manifest: &ImageManifest,
    what: &str,
) -> Result<Vec<Digest>, ImageError> {
    let ids = config.rootfs().diff_ids();
    if ids.len() != manifest.layers().len() {
        return Err(ImageError::MalformedImage {
            what: what.to_string(),
            detail: format!(
                "the manifest lists {} layers but the config {} diff-ids",
                manifest.layers().len(),
                ids.len()
            ),
        });
    }
    ids.iter().map(|id| parse_digest(id)).collect()
}

pub(crate) fn image_config(config: &ImageConfiguration) -> ImageConfig {
    let Some(c) = config.config() else {
        return ImageConfig::default();
    };
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    ImageConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: non_empty(c.working_dir()),
        user: non_empty(c.user()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_with_layer(media_type: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{0}","size":2}},
            "layers":[{{"mediaType":"{media_type}","digest":"sha256:{0}","size":2}}]}}"#,
            "a".repeat(64)
        )
    }

    #[test]
    fn gzip_zstd_and_plain_tar_layers_are_accepted() {
        for t in [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar",
            DOCKER_LAYER_GZIP,
        ] {
            assert!(matches!(parse_manifest(manifest_with_layer(t).as_bytes(), "m"), Ok(Manifest::Image(_))));
        }
    }

    #[test]
    fn a_layer_of_unknown_media_type_is_refused_before_download() {
        let err = parse_manifest(manifest_with_layer("application/x-squashfs").as_bytes(), "m");
        assert!(
            matches!(err, Err(ImageError::UnsupportedMediaType { media_type, .. }) if media_type == "application/x-squashfs")
        );
    }

    #[test]
    fn an_index_without_media_type_is_recognized_by_its_manifests() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":"sha256:{}","size":1,"platform":{{"os":"{}","architecture":"{}"}}}}]}}"#,
            "b".repeat(64),
            Os::default(),
            Arch::default()
        );
        let Ok(Manifest::Index(index)) = parse_manifest(index.as_bytes(), "i") else {
            panic!("not parsed as an index");
        };
        let chosen = select_platform(&index, "r").unwrap();
        assert_eq!(chosen.digest().to_string(), format!("sha256:{}", "b".repeat(64)));
    }

    #[test]
    fn an_index_without_this_platform_is_refused_naming_the_platform() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":"sha256:{}","size":1,"platform":{{"os":"windows","architecture":"s390x"}}}}]}}"#,
            "b".repeat(64)
        );
        let Ok(Manifest::Index(index)) = parse_manifest(index.as_bytes(), "i") else {
            panic!("not parsed as an index");
        };
        let err = select_platform(&index, "r").unwrap_err();
        assert!(err.to_string().contains(&this_platform()));
    }
}

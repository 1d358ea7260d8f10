//! Image references (`busybox`, `reg:5000/team/app:1`, `app@sha256:...`)
//! parsed by hand into oci-client's `Reference`, to the same grammar and
//! Docker defaults as its parser. That parser compiles a regex with Unicode
//! classes that holds about 17 MiB for the life of the process: the agent's
//! whole memory budget on a small device (docs/benchmarks.md).

use oci_client::Reference;

const DOCKER_HUB: &str = "docker.io";
const NAME_MAX: usize = 255;

/// Why a reference does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("the reference is empty")]
    Empty,
    #[error("{0}")]
    Invalid(&'static str),
}

pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
    if text.is_empty() {
        return Err(ReferenceError::Empty);
    }
    let (rest, digest) = match text.split_once('@') {
        Some((rest, digest)) => (rest, Some(check_digest(digest)?)),
        None => (text, None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(colon) => (&rest[..last_slash + colon], Some(check_tag(&rest[last_slash + colon + 1..])?)),
        None => (rest, None),
    };
    let (registry, repository) = split_domain(name)?;
    if repository.len() > NAME_MAX {
        return Err(ReferenceError::Invalid("the repository name is longer than 255 characters"));
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into()),
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").into()),
    })
}

fn check_digest(digest: &str) -> Result<&str, ReferenceError> {
    let (algorithm, hex) = digest.split_once(':').ok_or(ReferenceError::Invalid("a digest is ALGORITHM:HEX"))?;
    let length = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(ReferenceError::Invalid("the digest's algorithm is not sha256, sha384 or sha512")),
    };
    if hex.len() != length || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ReferenceError::Invalid("the digest's hex part has the wrong length or characters"));
    }
    Ok(digest)
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(tag: &str) -> Result<&str, ReferenceError> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let valid = tag.len() <= 128
        && tag.bytes().next().is_some_and(word)
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-');
    valid.then_some(tag).ok_or(ReferenceError::Invalid("a tag is letters, digits, `_`, `.` and `-`, at most 128"))
}

/// The registry and repository, as Docker reads them: the first part is a
/// registry when it has a `.` or a `:` or is `localhost`; Docker Hub's
/// single-part names are under `library/`.
fn split_domain(name: &str) -> Result<(String, String), ReferenceError> {
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            check_domain(first)?;
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    };
    for component in path.split('/') {
        check_component(component)?;
    }
    let registry = if registry == "index.docker.io" { DOCKER_HUB } else { registry };
    let repository =
        if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path.to_string() };
    Ok((registry.to_string(), repository))
}

/// Host labels (letters, digits, inner `-`) joined by `.`, then an optional `:PORT`.
fn check_domain(domain: &str) -> Result<(), ReferenceError> {
    let (host, port) = domain.split_once(':').map_or((domain, None), |(h, p)| (h, Some(p)));
    let label = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if host.split('.').all(label) && port_ok {
        Ok(())
    } else {
        Err(ReferenceError::Invalid("the registry is not a host name with an optional port"))
    }
}

/// Lowercase letters and digits, runs of them joined by `.`, `_`, `__` or any number of `-`.
fn check_component(component: &str) -> Result<(), ReferenceError> {
    let invalid =
        ReferenceError::Invalid("a repository path part is lowercase letters and digits joined by . _ __ or -");
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.first().is_none_or(|&b| !alnum(b)) || bytes.last().is_none_or(|&b| !alnum(b)) {
        return Err(invalid);
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        if !(separator == "." || separator == "_" || separator == "__" || separator.bytes().all(|b| b == b'-')) {
            return Err(invalid);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_parse_as_oci_clients_parser_parses_them() {
        for text in [
            "busybox".to_string(),
            "busybox:test".into(),
            "library/busybox:1".into(),
            "org/app".into(),
            "index.docker.io/org/app:v1".into(),
            "127.0.0.1:5000/app:1".into(),
            "localhost/app".into(),
            "localhost:5000/a/b/c:x_y.z-1".into(),
            "registry.example.com/team/app:2.0".into(),
            "my-registry.example.com:443/team/sub/app".into(),
            "app__x/a-b--c/d.e".into(),
            format!("busybox:test@{DIGEST}"),
            format!("registry.example.com:443/app@{DIGEST}"),
            format!("app@sha512:{}", "a".repeat(128)),
        ] {
            let theirs: Reference = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            let ours = parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                (ours.registry(), ours.repository(), ours.tag(), ours.digest()),
                (theirs.registry(), theirs.repository(), theirs.tag(), theirs.digest()),
                "{text}"
            );
        }
    }

    #[test]
    fn references_oci_clients_parser_refuses_are_refused() {
        for text in [
            "".to_string(),
            "Busybox".into(),
            "busybox:no spaces".into(),
            "busybox:".into(),
            "busybox:-x".into(),
            "app@sha256:1234".into(),
            format!("app@md5:{}", "a".repeat(32)),
            "reg.example.com:port/app".into(),
            "-reg.example.com/app".into(),
            "org//app".into(),
            "org/app/".into(),
            "a..b".into(),
            "a.-b".into(),
            format!("busybox:{}", "t".repeat(129)),
            format!("a/{}", "b".repeat(300)),
        ] {
            assert!(text.parse::<Reference>().is_err(), "oci-client takes {text:?}: fix this fixture");
            assert!(parse(&text).is_err(), "{text:?} was taken");
        }
    }
}

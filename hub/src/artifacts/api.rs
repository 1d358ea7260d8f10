//! The site cache over HTTP: `/v1/artifacts` and `/v1/tuf` for update
//! artifacts and their signed metadata, `/v2/` for the registry mirror
//! (docs/hub-api.md). Blobs are served with single-range support.

use std::io::SeekFrom;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::TryStreamExt;
use ota::Digest;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::mirror::MirrorError;
use super::{tuf_role, BlobInfo, CacheError, Mirror, OpenBlob};

const OCTETS: &str = "application/octet-stream";

pub fn router(mirror: Arc<Mirror>) -> Router {
    Router::new()
        .route("/v1/artifacts", get(list))
        .route("/v1/artifacts/{digest}", get(get_artifact).put(put_artifact))
        .route("/v1/tuf/{file}", get(get_tuf).put(put_tuf))
        .route("/v2/", get(v2_base))
        .route("/v2/{*path}", get(v2))
        .with_state(mirror)
}

/// An error of the `/v1` endpoints: `{ "error": "..." }` as the rest of the API.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Failure {
    Failure(status, message.into())
}

fn internal(e: CacheError) -> Failure {
    tracing::error!("site cache: {e}");
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn parse_digest(text: &str) -> Result<Digest, Failure> {
    text.parse().map_err(|e: ota::DigestParseError| error(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn list(State(mirror): State<Arc<Mirror>>) -> Result<Json<Vec<BlobInfo>>, Failure> {
    mirror.cache().list().map(Json).map_err(internal)
}

async fn get_artifact(
    State(mirror): State<Arc<Mirror>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let digest = parse_digest(&digest)?;
    match mirror.ensure_artifact(&digest).await {
        Ok(_) => {}
        Err(MirrorError::NotFound(why)) => return Err(error(StatusCode::NOT_FOUND, why)),
        Err(e) => return Err(error(StatusCode::BAD_GATEWAY, e.to_string())),
    }
    match mirror.cache().open_blob(&digest).await.map_err(internal)? {
        Some(blob) => Ok(serve(blob, &headers, OCTETS).await),
        None => Err(error(
            StatusCode::NOT_FOUND,
            format!("the hub has no artifact {digest}: push it with `hub artifact push FILE`"),
        )),
    }
}

/// An operator's upload: stored once the body hashes to the digest in the
/// URL, and pinned (never evicted).
async fn put_artifact(
    State(mirror): State<Arc<Mirror>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Failure> {
    let digest = parse_digest(&digest)?;
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let stream = body.into_data_stream().map_err(|e| CacheError::Transfer(e.to_string()));
    match mirror.cache().insert(&digest, length, stream, true).await {
        Ok(size) => {
            Ok((StatusCode::CREATED, Json(json!({ "digest": digest.to_string(), "size": size }))).into_response())
        }
        Err(e @ (CacheError::Io { .. } | CacheError::Transfer(_))) => Err(internal(e)),
        Err(e @ CacheError::TooLarge { .. }) => Err(error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, format!("upload refused, nothing stored: {e}"))),
    }
}

/// `role.json` to the role, when it is one the hub keeps.
fn tuf_file(file: &str) -> Result<&str, Failure> {
    file.strip_suffix(".json").filter(|role| tuf_role(role)).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!("no TUF metadata {file:?}: the hub keeps root.json, N.root.json, targets.json, snapshot.json and timestamp.json"),
        )
    })
}

async fn get_tuf(State(mirror): State<Arc<Mirror>>, Path(file): Path<String>) -> Result<Response, Failure> {
    let role = tuf_file(&file)?;
    // A site hub asks its parent first and keeps what it got; with the WAN
    // down it serves the last copy, which devices judge by its expiry.
    match mirror.parent_tuf(&file).await {
        Some(Ok(bytes)) => {
            mirror.cache().set_tuf(role, &bytes).map_err(internal)?;
            return Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response());
        }
        Some(Err(MirrorError::NotFound(why))) => return Err(error(StatusCode::NOT_FOUND, why)),
        Some(Err(e)) => tracing::warn!("site cache: serving the last {file} kept: {e}"),
        None => {}
    }
    match mirror.cache().tuf(role).map_err(internal)? {
        Some(bytes) => Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response()),
        None => Err(error(StatusCode::NOT_FOUND, format!("no {file} yet: push it with `hub tuf push DIR`"))),
    }
}

/// Stores signed metadata as it is: the hub holds no key, so it cannot sign
/// or change anything; devices verify what they get.
async fn put_tuf(
    State(mirror): State<Arc<Mirror>>,
    Path(file): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let role = tuf_file(&file)?;
    let signed = serde_json::from_slice::<serde_json::Value>(&body).ok().is_some_and(|v| {
        v.get("signed").is_some_and(|s| s.is_object()) && v.get("signatures").is_some_and(|s| s.is_array())
    });
    if !signed {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("{file} is not signed TUF metadata (a JSON object with \"signed\" and \"signatures\"): sign it with the `ota` tool"),
        ));
    }
    mirror.cache().set_tuf(role, &body).map_err(internal)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The registry API's error body, which registry clients read.
fn oci_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "errors": [{ "code": code, "message": message.into(), "detail": null }] });
    (status, Json(body)).into_response()
}

fn mirror_error(e: MirrorError, unknown: &str) -> Response {
    match e {
        MirrorError::InvalidName(m) => oci_error(StatusCode::BAD_REQUEST, "NAME_INVALID", m),
        MirrorError::Refused(m) => oci_error(StatusCode::FORBIDDEN, "DENIED", m),
        MirrorError::NotFound(m) => oci_error(StatusCode::NOT_FOUND, unknown, m),
        MirrorError::Upstream(m) => oci_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", m),
        MirrorError::Cache(m) => oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", m),
    }
}

async fn v2_base() -> Response {
    ([("docker-distribution-api-version", "registry/2.0")], Json(json!({}))).into_response()
}

/// `NAME/manifests/REFERENCE` and `NAME/blobs/DIGEST`, NAME having slashes.
async fn v2(State(mirror): State<Arc<Mirror>>, Path(path): Path<String>, headers: HeaderMap) -> Response {
    let segments: Vec<&str> = path.split('/').collect();
    let n = segments.len();
    let name_ok = n >= 3
        && segments[..n - 2].iter().all(|s| {
            !s.is_empty()
                && *s != "."
                && *s != ".."
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
        });
    if !name_ok {
        return oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("no endpoint /v2/{path}: the hub mirrors NAME/manifests/REFERENCE and NAME/blobs/DIGEST"),
        );
    }
    let name = segments[..n - 2].join("/");
    let reference = segments[n - 1];
    match segments[n - 2] {
        "manifests" => manifest(&mirror, &name, reference).await,
        "blobs" => blob(&mirror, &name, reference, &headers).await,
        _ => oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("no endpoint /v2/{path}: only manifests and blobs are read here"),
        ),
    }
}

async fn manifest(mirror: &Mirror, name: &str, reference: &str) -> Response {
    let valid_tag = !reference.is_empty()
        && reference.len() <= 128
        && reference.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid_tag && reference.parse::<Digest>().is_err() {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            format!("{reference:?} is neither a tag nor a sha256 digest"),
        );
    }
    match mirror.manifest(name, reference).await {
        Ok((bytes, digest)) => {
            let media_type = media_type(&bytes);
            (
                [
                    (header::CONTENT_TYPE, media_type),
                    (header::HeaderName::from_static("docker-content-digest"), digest.to_string()),
                ],
                bytes,
            )
                .into_response()
        }
        Err(e) => mirror_error(e, "MANIFEST_UNKNOWN"),
    }
}

/// The manifest's own `mediaType`; an OCI manifest may leave it out, then its shape tells.
fn media_type(bytes: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    match value.get("mediaType").and_then(|m| m.as_str()) {
        Some(media_type) => media_type.to_string(),
        None if value.get("manifests").is_some() => "application/vnd.oci.image.index.v1+json".into(),
        None => "application/vnd.oci.image.manifest.v1+json".into(),
    }
}

async fn blob(mirror: &Arc<Mirror>, name: &str, digest: &str, headers: &HeaderMap) -> Response {
    let Ok(digest) = digest.parse::<Digest>() else {
        return oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", format!("{digest:?} is not a sha256 digest"));
    };
    if let Err(e) = mirror.ensure_blob(name, &digest).await {
        return mirror_error(e, "BLOB_UNKNOWN");
    }
    match mirror.cache().open_blob(&digest).await {
        Ok(Some(blob)) => serve(blob, headers, OCTETS).await,
        // Evicted between the fetch and now: the client asks again.
        Ok(None) => oci_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!("{digest} was evicted as it arrived: ask again"),
        ),
        Err(e) => oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()),
    }
}

/// What a `Range` header asks of a blob of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Ranged {
    Whole,
    /// First and last byte, inclusive.
    Part(u64, u64),
    Unsatisfiable,
}

/// One range, `bytes=A-B`, `bytes=A-` or `bytes=-N`; several ranges or a
/// malformed header get the whole blob, as RFC 9110 allows.
fn ranged(header: Option<&HeaderValue>, len: u64) -> Ranged {
    let Some(spec) = header.and_then(|h| h.to_str().ok()).and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ranged::Whole;
    };
    let Some((first, last)) = spec.split_once('-').filter(|_| !spec.contains(',')) else { return Ranged::Whole };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| s.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        (true, false) => match number(last) {
            Some(0) => Ranged::Unsatisfiable,
            Some(_) if len == 0 => Ranged::Unsatisfiable,
            Some(suffix) => Ranged::Part(len.saturating_sub(suffix), len - 1),
            None => Ranged::Whole,
        },
        (false, _) => match (number(first), if last.is_empty() { Some(u64::MAX) } else { number(last) }) {
            (Some(a), Some(b)) if a <= b => {
                if a >= len {
                    Ranged::Unsatisfiable
                } else {
                    Ranged::Part(a, b.min(len - 1))
                }
            }
            _ => Ranged::Whole,
        },
        (true, true) => Ranged::Whole,
    }
}

/// A stored blob, whole or the range asked; ETag and `Docker-Content-Digest` are its digest.
async fn serve(blob: OpenBlob, headers: &HeaderMap, content_type: &str) -> Response {
    let OpenBlob { mut file, len, digest, guard } = blob;
    let (status, start, count) = match ranged(headers.get(header::RANGE), len) {
        Ranged::Whole => (StatusCode::OK, 0, len),
        Ranged::Part(first, last) => (StatusCode::PARTIAL_CONTENT, first, last - first + 1),
        Ranged::Unsatisfiable => {
            return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))])
                .into_response()
        }
    };
    if start > 0 {
        if let Err(e) = file.seek(SeekFrom::Start(start)).await {
            return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read {digest}: {e}")).into_response();
        }
    }
    // The guard lives as long as the body: no eviction while it streams.
    let chunks = futures_util::stream::try_unfold((file.take(count), guard), |(mut reader, guard)| async move {
        let mut buf = vec![0u8; 64 << 10];
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok::<_, std::io::Error>(Some((Bytes::from(buf), (reader, guard))))
    });
    let mut response = Response::new(Body::from_stream(chunks));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).expect("ASCII header value");
    headers.insert(header::CONTENT_TYPE, value(content_type.to_string()));
    headers.insert(header::CONTENT_LENGTH, value(count.to_string()));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::ETAG, value(format!("\"{digest}\"")));
    headers.insert("docker-content-digest", value(digest.to_string()));
    if status == StatusCode::PARTIAL_CONTENT {
        headers.insert(header::CONTENT_RANGE, value(format!("bytes {start}-{}/{len}", start + count - 1)));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_range_is_honoured_and_one_past_the_end_is_unsatisfiable() {
        let r = |h: &str, len| ranged(Some(&HeaderValue::from_str(h).unwrap()), len);
        assert_eq!(ranged(None, 10), Ranged::Whole);
        assert_eq!(r("bytes=0-", 10), Ranged::Part(0, 9));
        assert_eq!(r("bytes=4-", 10), Ranged::Part(4, 9));
        assert_eq!(r("bytes=2-5", 10), Ranged::Part(2, 5));
        assert_eq!(r("bytes=2-500", 10), Ranged::Part(2, 9));
        assert_eq!(r("bytes=-3", 10), Ranged::Part(7, 9));
        assert_eq!(r("bytes=-30", 10), Ranged::Part(0, 9));
        assert_eq!(r("bytes=10-", 10), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=0-", 0), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=-0", 10), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=5-2", 10), Ranged::Whole);
        assert_eq!(r("bytes=0-1,4-5", 10), Ranged::Whole);
        assert_eq!(r("items=0-1", 10), Ranged::Whole);
    }
}

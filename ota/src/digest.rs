//! SHA-256 content digests in the OCI form `sha256:<64 lowercase hex>`, and
//! readers/writers that hash what flows through them, so content is verified
//! while it streams instead of in a second pass.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use ring::digest::{Context, SHA256, SHA256_OUTPUT_LEN};

const PREFIX: &str = "sha256:";

/// A SHA-256 digest. Its string form is always `sha256:` and 64 lowercase hex
/// digits, so the hex part is safe to use as a file name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; SHA256_OUTPUT_LEN]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestParseError {
    #[error("digest {0:?} is not sha256 (only sha256:<hex> digests are supported)")]
    UnsupportedAlgorithm(String),
    #[error("digest {0:?} is not sha256: followed by 64 lowercase hex digits")]
    Malformed(String),
}

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        let mut hasher = Hasher::new();
        hasher.update(bytes);
        hasher.finish()
    }

    /// The 64 hex digits without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the bare 64-digit hex form (as used for file names).
    pub fn from_hex(hex: &str) -> Result<Self, DigestParseError> {
        let malformed = || DigestParseError::Malformed(hex.to_string());
        let valid = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
        if hex.len() != 2 * SHA256_OUTPUT_LEN || !hex.bytes().all(valid) {
            return Err(malformed());
        }
        let mut out = [0u8; SHA256_OUTPUT_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| malformed())?;
        }
        Ok(Self(out))
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("sha256", hex)) => Self::from_hex(hex).map_err(|_| DigestParseError::Malformed(s.to_string())),
            Some(_) => Err(DigestParseError::UnsupportedAlgorithm(s.to_string())),
            None => Err(DigestParseError::Malformed(s.to_string())),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An incremental SHA-256 that also counts the bytes it has seen.
#[derive(Clone)]
pub struct Hasher {
    context: Context,
    len: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Self { context: Context::new(&SHA256), len: 0 }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.context.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn byte_count(&self) -> u64 {
        self.len
    }

    pub fn finish(self) -> Digest {
        let mut out = [0u8; SHA256_OUTPUT_LEN];
        out.copy_from_slice(self.context.finish().as_ref());
        Digest(out)
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

/// Hashes everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: Hasher::new() }
    }

    /// The inner writer, the digest and the length of what was written.
    pub fn finish(self) -> (W, Digest, u64) {
        let len = self.hasher.byte_count();
        (self.inner, self.hasher.finish(), len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: Hasher::new() }
    }

    /// The digest and the length of what was read.
    pub fn finish(self) -> (Digest, u64) {
        let len = self.hasher.byte_count();
        (self.hasher.finish(), len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_empty_input_is_the_well_known_sha256() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
    }

    #[test]
    fn digest_round_trips_through_its_string_form() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Digest::from_hex(&d.hex()).unwrap(), d);
    }

    #[test]
    fn digest_parse_refuses_other_algorithms_and_malformed_hex() {
        assert!(matches!("sha512:abcd".parse::<Digest>(), Err(DigestParseError::UnsupportedAlgorithm(_))));
        assert!("sha256:ABC".parse::<Digest>().is_err());
        assert!(EMPTY.to_uppercase().parse::<Digest>().is_err());
        assert!("sha256:../../etc/passwd".parse::<Digest>().is_err());
        assert!("e3b0c442".parse::<Digest>().is_err());
    }

    #[test]
    fn hashing_reader_and_writer_agree_with_one_shot_digest() {
        let data = vec![7u8; 100_000];
        let mut reader = HashingReader::new(&data[..]);
        let mut writer = HashingWriter::new(Vec::new());
        io::copy(&mut reader, &mut writer).unwrap();
        let (out, written, wlen) = writer.finish();
        let (read, rlen) = reader.finish();
        assert_eq!(out, data);
        assert_eq!(written, Digest::of(&data));
        assert_eq!(read, written);
        assert_eq!((wlen, rlen), (100_000, 100_000));
    }
}

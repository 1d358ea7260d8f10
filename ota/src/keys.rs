//! Ed25519 keys for signing and verifying metadata, on ring.
//!
//! A private key file holds the key as PKCS#8 DER, raw bytes (what
//! `ota keygen` writes, and what `openssl genpkey -algorithm ed25519 -outform DER`
//! writes). DER rather than PEM keeps the format to one parser (ring's) and
//! leaves nothing to decode by hand; PEM keys convert with
//! `openssl pkey -in key.pem -outform DER -out key.der`.
//!
//! A public key is its 32 raw bytes, written in metadata as lowercase hex; its
//! key id is the hex SHA-256 of those bytes, so a key has exactly one id.

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519, ED25519_PUBLIC_KEY_LEN};

use crate::digest::Digest;
use crate::hex;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("could not generate an Ed25519 key: the system's random number generator failed")]
    Generate,
    #[error("the private key is not an unencrypted Ed25519 PKCS#8 DER key ({0}); convert PEM keys with `openssl pkey -outform DER`")]
    Pkcs8(String),
    #[error("public key {0:?} is not 64 lowercase hex digits (32 bytes of an Ed25519 key)")]
    PublicKey(String),
}

/// An Ed25519 private key that signs metadata.
#[derive(Debug)]
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// A new random key and its PKCS#8 (v2) DER bytes, to be written to a key file.
    pub fn generate() -> Result<(Self, Vec<u8>), KeyError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
        let key = Self::from_pkcs8(pkcs8.as_ref())?;
        Ok((key, pkcs8.as_ref().to_vec()))
    }

    /// Reads a PKCS#8 DER key. ring's checked parser takes only v2 documents
    /// (which carry the public key); openssl writes v1, which has no public key
    /// to check, so those go through the parser that derives it.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let pair = match Ed25519KeyPair::from_pkcs8(der) {
            Ok(pair) => pair,
            Err(_) => Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| KeyError::Pkcs8(e.to_string()))?,
        };
        Ok(Self { pair })
    }

    pub fn public_key(&self) -> PublicKey {
        let mut bytes = [0u8; ED25519_PUBLIC_KEY_LEN];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(bytes)
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PublicKey([u8; ED25519_PUBLIC_KEY_LEN]);

impl PublicKey {
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(text).ok_or_else(|| KeyError::PublicKey(text.to_string()))?;
        let bytes = bytes.try_into().map_err(|_| KeyError::PublicKey(text.to_string()))?;
        Ok(Self(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    /// The hex SHA-256 of the raw public key.
    pub fn key_id(&self) -> String {
        Digest::of(&self.0).hex()
    }

    /// Whether `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0).verify(message, signature).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `openssl genpkey -algorithm ed25519 -outform DER`: PKCS#8 v1, no public key inside.
    const OPENSSL_V1: [u8; 48] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20, 0x9d, 0x61,
        0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4, 0x44, 0x49, 0xc5, 0x69,
        0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60,
    ];
    // RFC 8032 test 1's public key for the secret key above.
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    #[test]
    fn a_generated_key_signs_what_its_public_key_verifies() {
        let (key, pkcs8) = SigningKey::generate().unwrap();
        let signature = key.sign(b"metadata");
        assert!(key.public_key().verify(b"metadata", &signature));
        assert!(!key.public_key().verify(b"metadatA", &signature));
        assert_eq!(SigningKey::from_pkcs8(&pkcs8).unwrap().public_key(), key.public_key());
    }

    #[test]
    fn another_keys_signature_does_not_verify() {
        let (a, _) = SigningKey::generate().unwrap();
        let (b, _) = SigningKey::generate().unwrap();
        assert!(!b.public_key().verify(b"metadata", &a.sign(b"metadata")));
    }

    #[test]
    fn an_openssl_pkcs8_v1_key_is_read_and_derives_its_public_key() {
        let key = SigningKey::from_pkcs8(&OPENSSL_V1).unwrap();
        assert_eq!(key.public_key().to_hex(), RFC8032_PUBLIC);
    }

    #[test]
    fn the_key_id_is_the_sha256_of_the_raw_public_key() {
        let key = PublicKey::from_hex(RFC8032_PUBLIC).unwrap();
        assert_eq!(key.key_id(), Digest::of(&key.0).hex());
        assert_eq!(key.key_id().len(), 64);
    }

    #[test]
    fn garbage_private_and_public_keys_are_refused() {
        assert!(matches!(SigningKey::from_pkcs8(b"not a key"), Err(KeyError::Pkcs8(_))));
        assert!(PublicKey::from_hex("abcd").is_err());
        assert!(PublicKey::from_hex(&RFC8032_PUBLIC.to_uppercase()).is_err());
    }
}

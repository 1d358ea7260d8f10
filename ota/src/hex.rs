//! Lowercase hex for key ids, public keys and signatures in metadata.

pub(crate) fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `None` unless `text` is an even number of lowercase hex digits: one spelling
/// per value, so a key id or signature cannot be written two ways.
pub(crate) fn decode(text: &str) -> Option<Vec<u8>> {
    let valid = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    if !text.bytes().all(valid) {
        return None;
    }
    let nibble = |c: u8| char::from(c).to_digit(16);
    let byte = |pair: &[u8]| match *pair {
        [high, low] => Some((nibble(high)? * 16 + nibble(low)?) as u8),
        _ => None,
    };
    text.as_bytes().chunks(2).map(byte).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_uppercase_and_odd_lengths() {
        assert_eq!(encode(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(decode("00abff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(decode("00ABFF"), None);
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("zz"), None);
    }
}

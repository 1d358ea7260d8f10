//! Canonical JSON, as TUF and OLPC define it: object keys sorted, no
//! whitespace, and strings escaping only `"` and `\`. A signature covers the
//! canonical form of a document's `signed` object, so the file itself may be
//! pretty-printed or reordered without breaking it.
//!
//! One departure: OLPC allows integers only, and TUF metadata has no other
//! numbers, but a signed deployment carries a workload's `cpus` (`0.5`). A
//! finite float is written in its shortest form that reads back to the same
//! `f64` (serde_json's, by ryu), so one value has one spelling whichever
//! parser (JSON, TOML) read it. NaN and infinities have no JSON form at all.

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CanonicalError {
    #[error("the value cannot be represented as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The canonical JSON bytes of `value`.
pub fn to_canonical<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    let value = serde_json::to_value(value)?;
    let mut out = Vec::new();
    write_value(&value, &mut out)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Sorted here rather than trusting the map's order: serde_json keeps
            // insertion order when any crate in the build enables `preserve_order`.
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_value(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for byte in s.bytes() {
        if byte == b'"' || byte == b'\\' {
            out.push(b'\\');
        }
        out.push(byte);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canonical(value: Value) -> String {
        String::from_utf8(to_canonical(&value).unwrap()).unwrap()
    }

    #[test]
    fn object_keys_are_sorted_at_every_depth_without_whitespace() {
        let value = json!({"b": 1, "a": {"z": [3, 2, 1], "y": null}, "_type": true});
        assert_eq!(canonical(value), r#"{"_type":true,"a":{"y":null,"z":[3,2,1]},"b":1}"#);
    }

    #[test]
    fn keys_sort_by_code_point_not_by_locale() {
        assert_eq!(canonical(json!({"b": 0, "B": 0, "é": 0, "a": 0})), r#"{"B":0,"a":0,"b":0,"é":0}"#);
    }

    #[test]
    fn only_quote_and_backslash_are_escaped_in_strings() {
        let value = json!({"s": "q\"b\\n\nt\tü"});
        assert_eq!(canonical(value), "{\"s\":\"q\\\"b\\\\n\nt\tü\"}");
    }

    #[test]
    fn negative_and_large_integers_are_written_plainly() {
        assert_eq!(canonical(json!([-1, 0, u64::MAX])), "[-1,0,18446744073709551615]");
    }

    #[test]
    fn floats_are_written_in_their_shortest_form_whichever_parser_read_them() {
        assert_eq!(canonical(json!([0.5, 1.0, 0.1, 1e21, -2.5e-7])), "[0.5,1.0,0.1,1e+21,-2.5e-7]");
        let from_toml: toml::Table = toml::from_str("cpus = 0.1").unwrap();
        let from_json: Value = serde_json::from_str(r#"{"cpus": 0.100}"#).unwrap();
        assert_eq!(to_canonical(&from_toml).unwrap(), to_canonical(&from_json).unwrap());
    }
}

//! Tests that need root and a real kernel live in tests/.

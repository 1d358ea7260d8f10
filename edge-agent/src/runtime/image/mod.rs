//! Images: pull, import, unpack, collect.

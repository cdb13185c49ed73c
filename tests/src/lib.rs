//! End-to-end tests of the `postcopy` binary live in `tests/`; this crate
//! has no library code of its own.

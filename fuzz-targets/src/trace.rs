//! `POSTCOPY_FUZZ_TRACE=1`: the targets print each event and the state
//! after it, to read a crash (see the README, "Fuzzing").

/// Whether `POSTCOPY_FUZZ_TRACE` is set: the state-machine targets then
/// print every event and the state after it (read once).
pub fn enabled() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("POSTCOPY_FUZZ_TRACE").is_some())
}

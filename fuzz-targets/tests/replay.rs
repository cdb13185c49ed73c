//! Replays every saved corpus file and crash artifact of every fuzz target,
//! on stable, without libFuzzer: `fuzz/corpus/<target>/*` and
//! `fuzz/artifacts/<target>/*`, each run once through the same function the
//! cargo-fuzz binary calls, decoded the same way. A regression makes the
//! input's file name and the panic appear here.
//!
//! `POSTCOPY_FUZZ_REPLAY=path...` (colon-separated files) replays only those.

use std::path::{Path, PathBuf};

use postcopy_fuzz_targets::{Target, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(target: &Target) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for kind in ["corpus", "artifacts"] {
        let dir = fuzz_dir().join(kind).join(target.name);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.expect("readable directory").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &Target, files: &[PathBuf]) {
    for path in files {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let result = std::panic::catch_unwind(|| (target.run)(&bytes));
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!("{} fails on {}: {message}", target.name, path.display());
        }
    }
}

fn replay_target(name: &str) {
    let target = TARGETS.iter().find(|t| t.name == name).expect("a known target");
    if let Ok(only) = std::env::var("POSTCOPY_FUZZ_REPLAY") {
        let files: Vec<PathBuf> =
            only.split(':').map(PathBuf::from).filter(|p| p.components().any(|c| c.as_os_str() == name)).collect();
        replay(target, &files);
        return;
    }
    let files = inputs(target);
    assert!(
        files.iter().any(|p| p.components().any(|c| c.as_os_str() == "corpus")),
        "{name} has no seed corpus in {}",
        fuzz_dir().display()
    );
    replay(target, &files);
    println!("{name}: replayed {} inputs", files.len());
}

#[test]
fn wire_decode() {
    replay_target("wire_decode");
}

#[test]
fn source_events() {
    replay_target("source_events");
}

#[test]
fn destination_events() {
    replay_target("destination_events");
}

#[test]
fn pair() {
    replay_target("pair");
}

#[test]
fn qmp_session() {
    replay_target("qmp_session");
}

#[test]
fn every_target_has_a_replay_test() {
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    assert_eq!(names, ["wire_decode", "source_events", "destination_events", "pair", "qmp_session"]);
    for name in names {
        let binary = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(binary.is_file(), "{} is missing", binary.display());
    }
}

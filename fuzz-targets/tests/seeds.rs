//! The seed corpus in `fuzz/corpus/<target>/seed-*` is what
//! `postcopy_fuzz_targets::seeds::all()` builds, and each seed still does
//! what it is there for (a whole migration completes, an error class gives
//! its error). `POSTCOPY_WRITE_SEEDS=1` rewrites the files instead of
//! comparing them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use postcopy_fuzz_targets::seeds;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

#[test]
fn seeds_do_what_they_are_for_and_are_checked_in() {
    let write = std::env::var_os("POSTCOPY_WRITE_SEEDS").is_some();
    let mut names = BTreeSet::new();
    for seed in seeds::all() {
        assert!(names.insert((seed.target, seed.name.clone())), "duplicate seed {}", seed.name);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (seed.check)()));
        assert!(run.is_ok(), "seed {}/{} no longer does what it is for", seed.target, seed.name);
        let path = corpus_dir(seed.target).join(&seed.name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &seed.bytes).unwrap();
        } else {
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(on_disk == seed.bytes, "{} is stale: run with POSTCOPY_WRITE_SEEDS=1", path.display());
        }
    }
    // No stale seed files left behind.
    for target in ["wire_decode", "source_events", "destination_events", "pair", "qmp_session"] {
        let Ok(entries) = std::fs::read_dir(corpus_dir(target)) else { continue };
        for entry in entries {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.starts_with("seed-") {
                assert!(names.contains(&(target, name.clone())), "{target}/{name} is no longer built");
            }
        }
    }
    println!("{} seeds", names.len());
}

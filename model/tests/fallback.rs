//! Fallback (docs/fallback.md) in the model: each planted fallback bug is
//! caught with a counterexample, by the property meant for it, and the
//! clean core passes a small fallback configuration (crash, partition,
//! lease lapse and takeover, the destination's clock slow by the drift
//! bound) with every fallback outcome reached.

use postcopy_core::PlantedBug;
use postcopy_model::{
    check, find_cycle, MigrationModel, ModelConfig, ABANDONED_ASKED_AGAIN, FAIR_RUN_COMPLETES, ONE_RUNNER,
    ROLLBACK_EXACT,
};

/// Small enough for a test: the fallback configuration with 1 page.
fn small() -> ModelConfig {
    ModelConfig { pages: 1, ..ModelConfig::fallback() }
}

/// The properties that may report each plant (the fair run reports what
/// it sees on the way, by the same checks).
fn expected(bug: PlantedBug) -> &'static [&'static str] {
    match bug {
        PlantedBug::TakeoverWithoutLease | PlantedBug::FencedDestinationResumes => &[ONE_RUNNER, FAIR_RUN_COMPLETES],
        PlantedBug::CommitPartialCheckpoint
        | PlantedBug::CheckpointMissesPage
        | PlantedBug::AbandonedCheckpointForgetsPages => &[ROLLBACK_EXACT, FAIR_RUN_COMPLETES],
        _ => &[],
    }
}

/// The violation each plant must show in its trace.
fn symptom(bug: PlantedBug) -> &'static [&'static str] {
    match bug {
        PlantedBug::TakeoverWithoutLease | PlantedBug::FencedDestinationResumes => &["TwoRunners"],
        PlantedBug::CommitPartialCheckpoint
        | PlantedBug::CheckpointMissesPage
        | PlantedBug::AbandonedCheckpointForgetsPages => &["RollbackMismatch", "RollbackDeviceState"],
        _ => &[],
    }
}

#[test]
fn every_planted_fallback_bug_is_caught_with_a_trace() {
    // Not a safety bug: caught by reachability below. Nor the split of the
    // return path between writers, which the model does not have (it polls
    // the return path whole): the simulator catches that one.
    let skip = [PlantedBug::AbandonedCheckpointNotAskedAgain, PlantedBug::EocUnannounced];
    for bug in PlantedBug::FALLBACK.into_iter().filter(|b| !skip.contains(b)) {
        // Two pages: with one, the end of copy is due as soon as the page
        // arrives, and checkpoints stop before the guest's write.
        let report = check(&ModelConfig { plant: Some(bug), ..ModelConfig::fallback() }, 2);
        assert!(!report.failures.is_empty(), "{bug} was not caught ({} states)", report.unique_states);
        for (property, trace) in &report.failures {
            assert!(expected(bug).contains(property), "{bug} caught by an unexpected property {property}:\n{trace}");
            assert!(trace.contains("counterexample") && trace.contains(" 1. "), "no readable trace:\n{trace}");
            assert!(symptom(bug).iter().any(|s| trace.contains(s)), "{bug}: not the expected symptom:\n{trace}");
        }
        println!(
            "{bug}: caught by {:?} after {} states",
            report.failures.iter().map(|f| f.0).collect::<Vec<_>>(),
            report.unique_states
        );
    }
}

#[test]
fn the_fallback_plants_change_nothing_without_fallback() {
    for bug in PlantedBug::FALLBACK {
        let cfg = ModelConfig {
            pages: 2,
            precopy_rounds: 0,
            losses: 1,
            writes: 1,
            timers: 2,
            strangers: false,
            plant: Some(bug),
            ..ModelConfig::default()
        };
        let report = check(&cfg, 2);
        assert!(report.failures.is_empty(), "{bug} broke a migration without fallback");
    }
}

#[test]
fn clean_core_passes_the_small_fallback_configuration() {
    let cfg = small();
    let report = check(&cfg, 2);
    let failures: Vec<&str> = report.failures.iter().map(|f| f.1.as_str()).collect();
    assert!(failures.is_empty(), "{}:\n{}", cfg.summary(), failures.join("\n"));
    // One page: no fault can wait while the push is partway.
    let unreached: Vec<_> = report.unreached.iter().filter(|p| **p != "fault served during background push").collect();
    assert!(unreached.is_empty(), "{}: never reached {:?}", cfg.summary(), unreached);
    for wanted in [
        "a crashed destination: the source restarts the guest from a committed checkpoint",
        "a partitioned destination is superseded and drops its copy",
        "a lapsed lease fences the destination",
        "completes with fallback on: the source releases the guest",
        ABANDONED_ASKED_AGAIN,
    ] {
        assert!(report.reached.contains(&wanted), "{wanted} not reached: {:?}", report.reached);
    }
    let cycle = find_cycle(&MigrationModel::new(cfg.clone()));
    assert!(cycle.cycle.is_none(), "{}: a run never ends: {:?}", cfg.summary(), cycle.cycle);
}

/// `abandoned-checkpoint-forgets-pages` needs an abandoned checkpoint: with
/// `abandons: 0` the model never abandons one, and the plant passes.
#[test]
fn the_abandon_plant_needs_the_abandon_action() {
    let cfg = ModelConfig { abandons: 0, plant: Some(PlantedBug::AbandonedCheckpointForgetsPages), ..small() };
    let report = check(&cfg, 2);
    assert!(report.failures.is_empty(), "{}: failed without abandoning a checkpoint", cfg.summary());
}

/// `abandoned-checkpoint-not-asked-again` breaks no safety property (the
/// rollback stays exact, only older); the check fails because no state
/// has a checkpoint committed after an abandoned one.
#[test]
fn a_core_that_never_asks_again_after_an_abandon_is_caught_by_reachability() {
    let cfg = ModelConfig { plant: Some(PlantedBug::AbandonedCheckpointNotAskedAgain), ..small() };
    let report = check(&cfg, 2);
    assert!(report.failures.is_empty(), "{}: {:?}", cfg.summary(), report.failures);
    assert!(report.unreached.contains(&ABANDONED_ASKED_AGAIN), "{}: {:?}", cfg.summary(), report.unreached);
    // One page: as on the clean core, no fault waits while the push is partway.
    let others: Vec<_> = report
        .unreached
        .iter()
        .filter(|p| ![ABANDONED_ASKED_AGAIN, "fault served during background push"].contains(p))
        .collect();
    assert!(others.is_empty(), "{}: never reached {:?}", cfg.summary(), others);
    assert!(!report.passed());
}

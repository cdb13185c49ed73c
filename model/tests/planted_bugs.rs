//! Every planted bug is caught, with a counterexample trace, and the clean
//! core passes every property (small configurations; CI also runs the
//! default one through the command line).

use postcopy_core::PlantedBug;
use postcopy_model::{
    check, find_cycle, MigrationModel, ModelConfig, CROSSES_ONCE, FAIR_RUN_COMPLETES, NO_PAGE_LOST, ONE_RUNNER,
};

/// Small enough for a test, big enough for every plant: hybrid (stale
/// pages), a lost connection (recovery), writes on both sides.
fn small() -> ModelConfig {
    ModelConfig { pages: 2, vcpus: 1, precopy_rounds: 1, losses: 1, writes: 1, timers: 2, ..ModelConfig::default() }
}

/// The properties that may report each plant first.
fn expected(bug: PlantedBug) -> &'static [&'static str] {
    match bug {
        PlantedBug::BackgroundOverwritesNewer => &[NO_PAGE_LOST, CROSSES_ONCE, FAIR_RUN_COMPLETES],
        PlantedBug::EarlyEoc => &[NO_PAGE_LOST, FAIR_RUN_COMPLETES],
        PlantedBug::SourceResumesAfterSwitchover => &[ONE_RUNNER],
        PlantedBug::StaleNotDropped => &[NO_PAGE_LOST, FAIR_RUN_COMPLETES],
        PlantedBug::RequestForgottenOnReconnect => &[FAIR_RUN_COMPLETES],
        // Fallback plants: model/tests/fallback.rs.
        _ => &[],
    }
}

#[test]
fn every_planted_bug_is_caught_with_a_trace() {
    for bug in PlantedBug::ALL {
        let report = check(&ModelConfig { plant: Some(bug), ..small() }, 1);
        assert!(!report.failures.is_empty(), "{bug} was not caught ({} states)", report.unique_states);
        for (property, trace) in &report.failures {
            assert!(expected(bug).contains(property), "{bug} caught by an unexpected property {property}:\n{trace}");
            assert!(trace.contains("counterexample") && trace.contains(" 1. "), "no readable trace:\n{trace}");
        }
        println!(
            "{bug}: caught by {:?} after {} states",
            report.failures.iter().map(|f| f.0).collect::<Vec<_>>(),
            report.unique_states
        );
    }
}

#[test]
fn every_planted_bug_is_caught_in_pure_postcopy_too_where_it_applies() {
    for bug in PlantedBug::ALL {
        // A stale precopy page needs precopy.
        if bug == PlantedBug::StaleNotDropped {
            continue;
        }
        let cfg = ModelConfig { precopy_rounds: 0, plant: Some(bug), ..small() };
        let report = check(&cfg, 1);
        assert!(!report.failures.is_empty(), "{bug} was not caught in pure postcopy");
    }
}

fn assert_passes(cfg: ModelConfig) {
    let report = check(&cfg, 2);
    let failures: Vec<&str> = report.failures.iter().map(|f| f.1.as_str()).collect();
    assert!(failures.is_empty(), "{}:\n{}", cfg.summary(), failures.join("\n"));
    assert!(report.unreached.is_empty(), "{}: never reached {:?}", cfg.summary(), report.unreached);
    assert!(report.reached.len() >= 4, "{}: only {:?}", cfg.summary(), report.reached);
    let cycle = find_cycle(&MigrationModel::new(cfg.clone()));
    assert_eq!(cycle.states, report.unique_states, "the DFS and the BFS see the same states");
    assert!(cycle.cycle.is_none(), "{}: a run never ends: {:?}", cfg.summary(), cycle.cycle);
}

#[test]
fn clean_core_passes_hybrid_with_losses() {
    assert_passes(small());
}

#[test]
fn clean_core_passes_pure_postcopy_two_vcpus_device_page() {
    assert_passes(ModelConfig { precopy_rounds: 0, vcpus: 2, device_page: true, writes: 2, ..small() });
}

#[test]
fn clean_core_passes_without_urgent_channel() {
    assert_passes(ModelConfig { urgent_channel: false, ..small() });
}

#[test]
fn symmetry_only_merges_states() {
    let cfg = ModelConfig { precopy_rounds: 0, vcpus: 2, writes: 2, losses: 0, timers: 1, ..small() };
    let with = check(&cfg, 1);
    let without = check(&ModelConfig { symmetry: false, ..cfg }, 1);
    assert!(with.passed() && without.passed());
    assert!(with.unique_states < without.unique_states, "{} vs {}", with.unique_states, without.unique_states);
    assert_eq!(with.reached, without.reached);
}

/// Two push streams: pages of the background push cross on the main and a
/// push channel in any interleaving, and a loss of either is a recovery.
fn two_streams() -> ModelConfig {
    ModelConfig { precopy_rounds: 0, push_streams: 2, ..small() }
}

#[test]
fn clean_core_passes_with_two_push_streams() {
    let cfg = two_streams();
    let report = check(&cfg, 2);
    assert!(
        report.reached.contains(&"background pages in flight on two push streams at once"),
        "the model never had pages on two streams at once: {:?}",
        report.reached
    );
    assert_passes(cfg);
}

#[test]
fn planted_bugs_are_caught_with_two_push_streams() {
    for bug in PlantedBug::ALL {
        if bug == PlantedBug::StaleNotDropped {
            continue;
        }
        let report = check(&ModelConfig { plant: Some(bug), ..two_streams() }, 1);
        assert!(!report.failures.is_empty(), "{bug} was not caught with two push streams");
        for (property, trace) in &report.failures {
            assert!(expected(bug).contains(property), "{bug} caught by an unexpected property {property}:\n{trace}");
        }
    }
}

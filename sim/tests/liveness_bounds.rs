//! The derived liveness bound allows the schedules the cores must follow.
//! Seeds 1161, 1003098 and 1003121 failed NoProgress under an earlier bound
//! (twice the longest back-off): each abandons a migration just before the
//! faults heal, so its source withdraws through the whole back-off schedule
//! (a handshake timeout per attempt) before the next migration starts.

use postcopy_sim::{run, Scenario};

const WITHDRAWING_SEEDS: [u64; 3] = [1161, 1003098, 1003121];

fn field(scenario: &Scenario, key: &str) -> u64 {
    let (_, value) = scenario.fields().into_iter().find(|(k, _)| *k == key).expect("a known option");
    value.parse().expect("a number")
}

#[test]
fn runs_that_withdraw_after_the_heal_finish_within_the_derived_bound() {
    for seed in WITHDRAWING_SEEDS {
        let scenario = Scenario::with_overrides(seed, &[]).unwrap();
        let bound_ms = scenario.liveness_bound_ms();
        let result = run(scenario.clone(), 40);
        assert!(result.passed(), "seed {seed}: {:?}", result.violations);
        assert!(result.attempts > 1, "seed {seed} abandons a migration");

        // Under a generous bound, the time the run really takes after the
        // heal is within the derived one, and needs more than the
        // withdrawal's longest back-off twice.
        let generous = Scenario::with_overrides(seed, &[("liveness_ms".into(), "600000".into())]).unwrap();
        let result = run(generous, 0);
        let total_ms = result.report.total_ms.expect("completed");
        let after_heal_ms = total_ms - field(&scenario, "heal_ms") as f64;
        assert!(after_heal_ms <= bound_ms as f64, "seed {seed}: {after_heal_ms} ms after the heal > {bound_ms}");
        let schedule = scenario.liveness_schedule();
        assert!(schedule.withdrawal_ms > 2 * field(&scenario, "reconnect_max_ms"), "seed {seed}: {schedule:?}");
    }
}

//! Our states in QEMU's words: the core's states as QMP's
//! `MigrationStatus` and the guest's `RunState`, and the core's statistics
//! as `query-migrate`'s `ram` member.
//!
//! | source core | QMP status | guest here |
//! | --- | --- | --- |
//! | Connecting, Handshake | setup | running |
//! | Precopy, DirtySync | active | running |
//! | Stopping, FinalSync, Switchover (before StartGuest) | active | finish-migrate |
//! | Active, EocReceived, AllPagesSent, ErrorReceive | postcopy-active | finish-migrate |
//! | Paused | postcopy-paused | finish-migrate |
//! | Recovering | postcopy-recover | finish-migrate |
//! | Withdrawing | cancelling | running |
//! | Withdrawing after a fallback takeover | cancelling | finish-migrate, running once a vCPU runs again |
//! | Completed | completed | postmigrate |
//! | Failed | failed (cancelled after `migrate_cancel`) | running |
//! | Failed after a takeover whose restore failed | failed | internal-error |
//!
//! | destination core | QMP status | guest here |
//! | --- | --- | --- |
//! | Listening | setup | inmigrate |
//! | Precopy, LoadingDevice, AwaitingStart | active | inmigrate |
//! | Running | postcopy-active | running |
//! | Paused / Recovering | postcopy-paused / postcopy-recover | running |
//! | Completed | completed | running |
//! | Failed | failed | inmigrate |

use postcopy_core::{DestinationState, SourceState, SourceStats};
use postcopy_qmp::{MigrationInfo, MigrationStats, MigrationStatus, RunState, XPostcopyInfo};

use crate::driver::blocktime::BlocktimeFigures;
use crate::driver::report::{FallbackRecord, Takeover};
use crate::layout::PAGE_SIZE;

/// The QMP status of a source in `state`; `cancelled`: the user asked for
/// the cancel.
pub fn source_status(state: SourceState, cancelled: bool) -> MigrationStatus {
    use SourceState::*;
    match state {
        Connecting | Handshake => MigrationStatus::Setup,
        Precopy | DirtySync | Stopping | FinalSync | Switchover => MigrationStatus::Active,
        Active | EocReceived | AllPagesSent | ErrorReceive | Releasing => MigrationStatus::PostcopyActive,
        Paused => MigrationStatus::PostcopyPaused,
        Recovering => MigrationStatus::PostcopyRecover,
        Withdrawing => MigrationStatus::Cancelling,
        Completed => MigrationStatus::Completed,
        Failed if cancelled => MigrationStatus::Cancelled,
        Failed => MigrationStatus::Failed,
    }
}

/// The run state of the source's guest while its core is in `state`.
pub fn source_run_state(state: SourceState) -> RunState {
    use SourceState::*;
    match state {
        Connecting | Handshake | Precopy | DirtySync | Withdrawing | Failed => RunState::Running,
        Stopping | FinalSync | Switchover | Active | EocReceived | AllPagesSent | ErrorReceive | Paused
        | Recovering | Releasing => RunState::FinishMigrate,
        Completed => RunState::Postmigrate,
    }
}

/// The run state of the source's guest once its outgoing migration ended
/// with `status`: gone to the destination, running here (before the
/// switchover, or restarted by a fallback takeover), or, after a takeover
/// whose restore failed, parked with no state to run from: QEMU's
/// `internal-error`, which it too refuses to `cont` until a reset.
pub fn source_end_run_state(status: MigrationStatus, takeover: Option<&Takeover>) -> RunState {
    match (status, takeover) {
        (MigrationStatus::Completed, _) => RunState::Postmigrate,
        (_, Some(Takeover { error: Some(_), .. })) => RunState::InternalError,
        _ => RunState::Running,
    }
}

/// `x-postcopy`'s fallback fields on a source whose migration ran with
/// fallback, from the driver's record once it ended. The checkpoint the
/// guest restarted from only if it did restart (a failed restore leaves
/// it out; `error-desc` says why).
pub fn fill_source_fallback(x: &mut XPostcopyInfo, record: &FallbackRecord) {
    x.checkpoints_committed = Some(record.checkpoints_committed);
    x.checkpoint_bytes = Some(record.checkpoint_bytes);
    x.checkpoints_discarded = Some(record.checkpoints_discarded);
    x.restarted_from_checkpoint = record.takeover.as_ref().filter(|t| t.error.is_none()).map(|t| t.checkpoint);
}

/// The QMP status of a destination in `state`.
pub fn destination_status(state: DestinationState) -> MigrationStatus {
    use DestinationState::*;
    match state {
        Listening => MigrationStatus::Setup,
        Precopy | LoadingDevice | AwaitingStart => MigrationStatus::Active,
        Running => MigrationStatus::PostcopyActive,
        Paused => MigrationStatus::PostcopyPaused,
        Recovering => MigrationStatus::PostcopyRecover,
        Completed => MigrationStatus::Completed,
        Failed => MigrationStatus::Failed,
    }
}

/// The run state of the destination's guest: running once started here.
pub fn destination_run_state(guest_started: bool) -> RunState {
    if guest_started {
        RunState::Running
    } else {
        RunState::Inmigrate
    }
}

/// `query-migrate`'s `ram` on the source from the core's statistics:
/// `pages_sent` distinct pages of `total_pages` are on their way or there.
pub fn source_ram(stats: &SourceStats, pages_sent: u64, total_pages: u64, elapsed_ms: u64) -> MigrationStats {
    let page = PAGE_SIZE;
    let transferred = stats.page_bytes_sent.total();
    let zero = stats.pages_sent.zero;
    let normal = stats.pages_sent.total().saturating_sub(zero);
    MigrationStats {
        transferred,
        remaining: total_pages.saturating_sub(pages_sent) * page,
        total: total_pages * page,
        duplicate: zero,
        normal,
        normal_bytes: normal * page,
        mbps: if elapsed_ms == 0 { 0.0 } else { transferred as f64 * 8.0 / (elapsed_ms as f64 * 1000.0) },
        dirty_sync_count: u64::from(stats.precopy_rounds),
        postcopy_requests: stats.requests_received,
        page_size: page,
        precopy_bytes: stats.page_bytes_sent.precopy,
        postcopy_bytes: stats.page_bytes_sent.background + stats.page_bytes_sent.requested,
        ..Default::default()
    }
}

/// `query-migrate`'s `ram` on the destination: `present` pages of
/// `total_pages` are here.
pub fn destination_ram(present: u64, total_pages: u64) -> MigrationStats {
    let page = PAGE_SIZE;
    MigrationStats {
        transferred: present * page,
        remaining: total_pages.saturating_sub(present) * page,
        total: total_pages * page,
        normal: present,
        normal_bytes: present * page,
        page_size: page,
        ..Default::default()
    }
}

/// `query-migrate`'s postcopy fields on a destination with the
/// `postcopy-blocktime` capability, QEMU 10.1's: `postcopy-latency` (ns,
/// 0 before any remote fault) and `postcopy-latency-dist` always; the
/// per-vCPU fields and `postcopy-blocktime` (every vCPU blocked at once,
/// ms) only when faults name their vCPU (userfaultfd's thread ids), and
/// not `postcopy-non-vcpu-latency` (faults are not told apart by thread
/// outside the vCPUs).
pub fn fill_blocktime(info: &mut MigrationInfo, figures: &BlocktimeFigures) {
    let ms = |ns: u64| u32::try_from(ns / 1_000_000).unwrap_or(u32::MAX);
    let average = |total: u64, count: u64| total.checked_div(count).unwrap_or(0);
    info.postcopy_latency = Some(average(figures.latency_ns, figures.faults));
    info.postcopy_latency_dist = Some(figures.latency_buckets.to_vec());
    if !figures.vcpu_blocked_ns.is_empty() {
        info.postcopy_blocktime = Some(ms(figures.all_blocked_ns));
        info.postcopy_vcpu_blocktime = Some(figures.vcpu_blocked_ns.iter().map(|&ns| ms(ns)).collect());
        info.postcopy_vcpu_latency =
            Some(figures.vcpu_blocked_ns.iter().zip(&figures.vcpu_faults).map(|(&ns, &n)| average(ns, n)).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postcopy_core::stats::ByKind;

    #[test]
    fn the_switchover_is_still_active_and_cancellable_in_qemus_words() {
        assert_eq!(source_status(SourceState::Switchover, false), MigrationStatus::Active);
        assert!(MigrationStatus::Active.is_running());
        assert_eq!(source_status(SourceState::Active, false), MigrationStatus::PostcopyActive);
        assert_eq!(source_status(SourceState::Failed, true), MigrationStatus::Cancelled);
        assert_eq!(source_status(SourceState::Failed, false), MigrationStatus::Failed);
        assert_eq!(source_run_state(SourceState::Switchover), RunState::FinishMigrate);
        assert_eq!(source_run_state(SourceState::Withdrawing), RunState::Running);
        assert_eq!(destination_status(DestinationState::Running), MigrationStatus::PostcopyActive);
        assert_eq!(destination_run_state(false), RunState::Inmigrate);
    }

    #[test]
    fn a_takeover_whose_restore_failed_leaves_a_guest_that_cannot_run() {
        let takeover = |error: Option<&str>| Takeover {
            checkpoint: 4,
            last_heard_ns: 1,
            running_ns: 2,
            error: error.map(str::to_owned),
        };
        let (restored, failed) = (takeover(None), takeover(Some("bad device state")));
        assert_eq!(source_end_run_state(MigrationStatus::Failed, Some(&restored)), RunState::Running);
        assert_eq!(source_end_run_state(MigrationStatus::Failed, Some(&failed)), RunState::InternalError);
        assert_eq!(source_end_run_state(MigrationStatus::Failed, None), RunState::Running);
        assert_eq!(source_end_run_state(MigrationStatus::Cancelled, None), RunState::Running);
        assert_eq!(source_end_run_state(MigrationStatus::Completed, None), RunState::Postmigrate);
        let mut record = FallbackRecord {
            checkpoints_committed: 4,
            checkpoint_pages: 10,
            checkpoint_bytes: 40_960,
            checkpoints_discarded: 1,
            takeover: Some(restored),
        };
        let mut x = XPostcopyInfo::default();
        fill_source_fallback(&mut x, &record);
        assert_eq!(
            (x.checkpoints_committed, x.checkpoint_bytes, x.checkpoints_discarded, x.restarted_from_checkpoint),
            (Some(4), Some(40_960), Some(1), Some(4))
        );
        record.takeover = Some(failed);
        fill_source_fallback(&mut x, &record);
        assert_eq!(x.restarted_from_checkpoint, None, "the guest did not restart");
        record.takeover = None;
        fill_source_fallback(&mut x, &record);
        assert_eq!((x.checkpoints_committed, x.restarted_from_checkpoint), (Some(4), None));
    }

    #[test]
    fn blocktime_fields_follow_qemus_units() {
        let mut figures = BlocktimeFigures {
            vcpu_blocked_ns: vec![3_500_000, 0],
            vcpu_faults: vec![7, 0],
            all_blocked_ns: 1_200_000,
            faults: 4,
            latency_ns: 1_000,
            ..Default::default()
        };
        figures.latency_buckets[2] = 4;
        let mut info = MigrationInfo::default();
        fill_blocktime(&mut info, &figures);
        assert_eq!(info.postcopy_blocktime, Some(1));
        assert_eq!(info.postcopy_vcpu_blocktime, Some(vec![3, 0]));
        assert_eq!(info.postcopy_vcpu_latency, Some(vec![500_000, 0]));
        assert_eq!(info.postcopy_latency, Some(250));
        assert_eq!(info.postcopy_latency_dist.as_ref().map(|d| (d.len(), d[2])), Some((24, 4)));
        // Without thread ids: no per-vCPU figure, and no blocktime made of none.
        let mut info = MigrationInfo::default();
        fill_blocktime(&mut info, &BlocktimeFigures::default());
        assert_eq!(
            (info.postcopy_latency, info.postcopy_blocktime, info.postcopy_vcpu_blocktime),
            (Some(0), None, None)
        );
    }

    #[test]
    fn ram_figures_follow_the_core() {
        let stats = SourceStats {
            pages_sent: ByKind { precopy: 10, background: 5, requested: 1, resent: 0, zero: 4 },
            page_bytes_sent: ByKind { precopy: 40_000, background: 20_000, requested: 4_100, resent: 0, zero: 0 },
            precopy_rounds: 2,
            requests_received: 3,
            ..Default::default()
        };
        let ram = source_ram(&stats, 16, 100, 10);
        assert_eq!(ram.total, 100 * PAGE_SIZE);
        assert_eq!(ram.remaining, 84 * PAGE_SIZE);
        assert_eq!(ram.transferred, 64_100);
        assert_eq!((ram.duplicate, ram.normal, ram.normal_bytes), (4, 12, 12 * PAGE_SIZE));
        assert_eq!((ram.precopy_bytes, ram.postcopy_bytes), (40_000, 24_100));
        assert_eq!((ram.dirty_sync_count, ram.postcopy_requests), (2, 3));
        assert!((ram.mbps - 64_100.0 * 8.0 / 10_000.0).abs() < 1e-9);
        let ram = destination_ram(30, 100);
        assert_eq!((ram.transferred, ram.remaining), (30 * PAGE_SIZE, 70 * PAGE_SIZE));
    }
}

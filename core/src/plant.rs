//! Planted bugs: realistic mistakes compiled in only with the `planted-bugs`
//! feature, so that the model checker, the simulator and the fuzzers can show
//! that they catch each one. Production builds do not have this module.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A deliberate bug, switched on through [`Config::plant`](crate::Config).
/// [`PlantedBug::ALL`] lists the protocol's, [`PlantedBug::FALLBACK`] the fallback's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlantedBug {
    /// The background push re-sends a page already sent on request, and the
    /// destination installs it over the page the guest has written since.
    BackgroundOverwritesNewer,
    /// The destination declares the end of copy one page early.
    EarlyEoc,
    /// On a lost connection after the switchover, the source takes the guest
    /// back and runs it, although the destination may be running it too.
    SourceResumesAfterSwitchover,
    /// The source forgets to tell the destination to drop precopy pages the
    /// guest dirtied before the stop.
    StaleNotDropped,
    /// On recovery the source drops its queue of requested pages but keeps
    /// them marked as queued, so nothing ever sends them.
    RequestForgottenOnReconnect,
    /// Fallback: the source takes the guest back as soon as it has not
    /// heard from the destination for the margin alone, without waiting
    /// for the destination's lease to lapse.
    TakeoverWithoutLease,
    /// Fallback: the source commits a checkpoint cut off by a lost
    /// connection instead of discarding what it staged.
    CommitPartialCheckpoint,
    /// Fallback: the destination's checkpoint leaves out the last page the
    /// guest dirtied before its instant.
    CheckpointMissesPage,
    /// Fallback: a fenced destination resumes on a late grant, counting
    /// the renewed lease from the grant's arrival instead of from its
    /// request's departure.
    FencedDestinationResumes,
    /// Fallback, a driver's bug (planted in the testkit's and the
    /// simulator's fake destination drivers, which read it from the
    /// destination's config): a checkpoint abandoned after it read and
    /// cleared the dirty log drops those pages instead of carrying them
    /// into the next checkpoint.
    AbandonedCheckpointForgetsPages,
    /// Fallback: the destination core ignores an abandoned checkpoint and
    /// keeps waiting for it, so it never asks for another: the fallback
    /// image stays at the last commit before it (a rollback stays exact,
    /// only ever older).
    AbandonedCheckpointNotAskedAgain,
    /// Fallback: [`Destination::return_bulk_pending`](crate::Destination::return_bulk_pending)
    /// leaves out a queued end of copy, so a driver whose return writer
    /// sends it (the KVM driver's, the simulator's with `return_writer_us`)
    /// is never woken for it and the migration never completes.
    EocUnannounced,
}

impl PlantedBug {
    pub const ALL: [PlantedBug; 5] = [
        PlantedBug::BackgroundOverwritesNewer,
        PlantedBug::EarlyEoc,
        PlantedBug::SourceResumesAfterSwitchover,
        PlantedBug::StaleNotDropped,
        PlantedBug::RequestForgottenOnReconnect,
    ];

    /// The fallback bugs (they need a migration with fallback on).
    pub const FALLBACK: [PlantedBug; 7] = [
        PlantedBug::TakeoverWithoutLease,
        PlantedBug::CommitPartialCheckpoint,
        PlantedBug::CheckpointMissesPage,
        PlantedBug::FencedDestinationResumes,
        PlantedBug::AbandonedCheckpointForgetsPages,
        PlantedBug::AbandonedCheckpointNotAskedAgain,
        PlantedBug::EocUnannounced,
    ];

    /// Every planted bug: [`PlantedBug::ALL`] (the protocol's) and [`PlantedBug::FALLBACK`].
    pub fn every() -> impl Iterator<Item = PlantedBug> {
        PlantedBug::ALL.into_iter().chain(PlantedBug::FALLBACK)
    }

    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::BackgroundOverwritesNewer => "background-overwrites-newer",
            PlantedBug::EarlyEoc => "early-eoc",
            PlantedBug::SourceResumesAfterSwitchover => "source-resumes-after-switchover",
            PlantedBug::StaleNotDropped => "stale-not-dropped",
            PlantedBug::RequestForgottenOnReconnect => "request-forgotten-on-reconnect",
            PlantedBug::TakeoverWithoutLease => "takeover-without-lease",
            PlantedBug::CommitPartialCheckpoint => "commit-partial-checkpoint",
            PlantedBug::CheckpointMissesPage => "checkpoint-misses-page",
            PlantedBug::FencedDestinationResumes => "fenced-destination-resumes",
            PlantedBug::AbandonedCheckpointForgetsPages => "abandoned-checkpoint-forgets-pages",
            PlantedBug::AbandonedCheckpointNotAskedAgain => "abandoned-checkpoint-not-asked-again",
            PlantedBug::EocUnannounced => "eoc-unannounced",
        }
    }
}

impl fmt::Display for PlantedBug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PlantedBug {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PlantedBug::every().find(|bug| bug.name() == s).ok_or_else(|| {
            format!("unknown planted bug {s:?}; known: {:?}", PlantedBug::every().map(|b| b.name()).collect::<Vec<_>>())
        })
    }
}

//! Planted bugs: realistic mistakes compiled in only with the `planted-bugs`
//! feature, so that the model checker, the simulator and the fuzzers can show
//! that they catch each one. Production builds do not have this module.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A deliberate bug, switched on through [`Config::plant`](crate::Config).
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
}

impl PlantedBug {
    pub const ALL: [PlantedBug; 5] = [
        PlantedBug::BackgroundOverwritesNewer,
        PlantedBug::EarlyEoc,
        PlantedBug::SourceResumesAfterSwitchover,
        PlantedBug::StaleNotDropped,
        PlantedBug::RequestForgottenOnReconnect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::BackgroundOverwritesNewer => "background-overwrites-newer",
            PlantedBug::EarlyEoc => "early-eoc",
            PlantedBug::SourceResumesAfterSwitchover => "source-resumes-after-switchover",
            PlantedBug::StaleNotDropped => "stale-not-dropped",
            PlantedBug::RequestForgottenOnReconnect => "request-forgotten-on-reconnect",
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
        PlantedBug::ALL
            .into_iter()
            .find(|bug| bug.name() == s)
            .ok_or_else(|| format!("unknown planted bug {s:?}; known: {:?}", PlantedBug::ALL.map(|b| b.name())))
    }
}

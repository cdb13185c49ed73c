//! Fake hosts: each owns one core and carries out its actions the way a real
//! driver would, against a fake guest whose pages hold content versions.

use bytes::Bytes;

use super::content::{fill_page, page_version};
use super::oracle::Violation;
use crate::admission::ConnectionId;
use crate::bitmap::Bitmap;
use crate::channel::Channel;
use crate::config::Config;
use crate::destination::{Destination, DestinationAction, Waiter};
use crate::layout::{PageNumber, RamLayout};
use crate::outcome::{Finished, Notice};
use crate::source::{GuestMemory, Source, SourceAction};
use crate::stats::{DestinationStats, Observed, SourceStats};
use crate::time::Timestamp;
use crate::wire::PageData;

/// The device state the fake destination driver captures at checkpoint `seq`.
pub fn checkpoint_device_state(seq: u64) -> Bytes {
    Bytes::from(format!("device state at checkpoint {seq}"))
}

/// The source's guest RAM: a content version per page, and the dirty log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceGuest {
    pub versions: Vec<u64>,
    pub dirty: Bitmap,
}

impl SourceGuest {
    pub fn new(pages: u64) -> Self {
        Self { versions: vec![0; pages as usize], dirty: Bitmap::new(pages) }
    }

    pub fn write(&mut self, page: PageNumber, version: u64) {
        self.versions[page.0 as usize] = version;
        self.dirty.set(page.0);
    }
}

impl GuestMemory for SourceGuest {
    fn read_page(&self, page: PageNumber, out: &mut [u8]) {
        fill_page(out, page, self.versions[page.0 as usize]);
    }
}

/// What a host asks of the network: connections to open and close.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LinkRequests {
    pub connect: Vec<Channel>,
    /// Channels to close, with the last bytes to deliver first (a farewell).
    pub close: Vec<(Channel, Option<Bytes>)>,
    /// Provisional connections the destination made current.
    pub promote: Vec<ConnectionId>,
    /// Provisional connections the destination refused.
    pub close_provisional: Vec<ConnectionId>,
}

/// The source host: a [`Source`] and its guest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceHost {
    pub core: Source,
    pub guest: SourceGuest,
    pub running: bool,
    /// The core transmitted StartGuest: it must never run the guest again.
    pub past_start: bool,
    pub device_state: Bytes,
    pub links: LinkRequests,
    pub finished_ok: Option<bool>,
    pub finished: Observed<Option<Finished<SourceStats>>>,
    pub recovered: bool,
    pub violations: Vec<Violation>,
    /// Fallback: pages of the checkpoint being received, not yet in the
    /// fallback image (`guest`), with their versions.
    pub staging: Vec<(PageNumber, u64)>,
    /// Fallback: the guest stopped here just now (the harness records the
    /// guest's image at that instant).
    pub stopped_now: bool,
    /// Fallback: the core took the guest back just now: (checkpoint,
    /// device state it gave).
    pub took_over_now: Option<(u64, Bytes)>,
}

impl SourceHost {
    pub fn new(config: Config, layout: RamLayout, session: u64, device_state: Bytes) -> Self {
        let pages = layout.total_pages();
        Self {
            core: Source::new(config, layout, session),
            guest: SourceGuest::new(pages),
            running: true,
            past_start: false,
            device_state,
            links: LinkRequests::default(),
            finished_ok: None,
            finished: Observed(None),
            recovered: false,
            violations: Vec::new(),
            staging: Vec::new(),
            stopped_now: false,
            took_over_now: None,
        }
    }

    /// Carries out every pending action.
    pub fn process(&mut self, now: Timestamp) {
        while let Some(action) = self.core.poll_action() {
            match action {
                SourceAction::Connect(channel) => self.links.connect.push(channel),
                SourceAction::Close(channel) => self.links.close.push((channel, None)),
                SourceAction::Farewell { channel, bytes } => self.links.close.push((channel, Some(bytes))),
                SourceAction::StopVcpus => {
                    self.running = false;
                    self.stopped_now = true;
                    let state = self.device_state.clone();
                    if let Err(error) = self.core.handle_vcpus_stopped(now, state) {
                        self.violations.push(Violation::DriverEvent { error: error.to_string() });
                    }
                }
                SourceAction::ResumeVcpus => {
                    if self.past_start {
                        self.violations.push(Violation::SourceResumedAfterStart);
                    }
                    self.running = true;
                }
                SourceAction::SyncDirtyLog => {
                    let dirty: Vec<PageNumber> =
                        (0..self.guest.dirty.len()).filter(|&p| self.guest.dirty.get(p)).map(PageNumber).collect();
                    self.guest.dirty.clear_all();
                    let result = self
                        .core
                        .handle_dirty_pages(now, dirty)
                        .and_then(|()| self.core.handle_dirty_sync_complete(now));
                    if let Err(error) = result {
                        self.violations.push(Violation::DriverEvent { error: error.to_string() });
                    }
                }
                SourceAction::Notice(Notice::Recovered { .. }) => self.recovered = true,
                SourceAction::Notice(_) => {}
                SourceAction::Finished(finished) => {
                    self.finished_ok = Some(finished.result.is_ok());
                    self.finished.0 = Some(*finished);
                }
                SourceAction::StageCheckpointPage { page, data, .. } => {
                    let version = match &data {
                        PageData::Zero => Some(0),
                        PageData::Bytes(bytes) => page_version(bytes, page),
                    };
                    match version {
                        Some(version) => self.staging.push((page, version)),
                        None => self.violations.push(Violation::CorruptPage { page: page.0 }),
                    }
                }
                SourceAction::CommitCheckpoint { .. } => {
                    // Into the fallback image; not a write of the guest
                    // (not in the dirty log).
                    for (page, version) in self.staging.drain(..) {
                        self.guest.versions[page.0 as usize] = version;
                    }
                }
                SourceAction::DiscardCheckpoint { .. } => self.staging.clear(),
                SourceAction::TakeOver { checkpoint, device_state } => {
                    self.running = true;
                    self.took_over_now = Some((checkpoint, device_state));
                }
            }
        }
        self.observe();
    }

    /// Records whether the core passed the point of no return.
    pub fn observe(&mut self) {
        if self.core.state().after_start() {
            self.past_start = true;
        }
    }
}

/// The destination host: a [`Destination`] and guest RAM that starts empty.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DestHost {
    pub core: Destination,
    /// Version of each present page; `None` where the page is missing.
    pub memory: Vec<Option<u64>>,
    /// The layout memory was prepared for (page sizes per block).
    pub layout: Option<RamLayout>,
    pub running: bool,
    pub expected_device_state: Bytes,
    /// Pages the device-state load touches before it can finish.
    pub device_pages: Vec<PageNumber>,
    /// A device-state load in progress.
    pub loading: bool,
    pub links: LinkRequests,
    pub finished_ok: Option<bool>,
    pub finished: Observed<Option<Finished<DestinationStats>>>,
    pub violations: Vec<Violation>,
    /// Fallback: pages the guest wrote here since the last checkpoint (the
    /// dirty log).
    pub dirty: Bitmap,
    /// Fallback: checkpoints taken just now (the harness records the
    /// guest's image at each one's instant).
    pub checkpoints_taken: Vec<u64>,
    /// Fallback: the next this many checkpoints are abandoned instead of
    /// taken (as a driver does when the guest is fenced mid-checkpoint).
    pub abandon_checkpoints: u32,
    /// Fallback: the last checkpoint abandoned (its sequence number).
    pub abandoned: Option<u64>,
    /// Pages whose parts are being placed where the guest cannot see them
    /// (the driver's placement mapping): their bytes, and which bytes a
    /// part has written.
    pub placed: std::collections::BTreeMap<u64, (Vec<u8>, Vec<bool>)>,
}

impl DestHost {
    pub fn new(config: Config, page_size: u32, expected_device_state: Bytes, device_pages: Vec<PageNumber>) -> Self {
        Self {
            core: Destination::new(config, page_size),
            memory: Vec::new(),
            layout: None,
            running: false,
            expected_device_state,
            device_pages,
            loading: false,
            links: LinkRequests::default(),
            finished_ok: None,
            finished: Observed(None),
            violations: Vec::new(),
            dirty: Bitmap::new(0),
            checkpoints_taken: Vec::new(),
            abandon_checkpoints: 0,
            abandoned: None,
            placed: std::collections::BTreeMap::new(),
        }
    }

    pub fn is_present(&self, page: PageNumber) -> bool {
        self.memory.get(page.0 as usize).is_some_and(|v| v.is_some())
    }

    /// Carries out every pending action, including the device-state load.
    pub fn process(&mut self, now: Timestamp) {
        loop {
            while let Some(action) = self.core.poll_action() {
                self.apply(now, action);
            }
            if !self.try_finish_loading(now) {
                break;
            }
        }
    }

    fn apply(&mut self, now: Timestamp, action: DestinationAction) {
        match action {
            DestinationAction::PrepareMemory(layout) => {
                self.memory = vec![None; layout.total_pages() as usize];
                self.dirty = Bitmap::new(layout.total_pages());
                self.layout = Some(layout);
            }
            DestinationAction::PlacePagePart { page, offset, data } => {
                let page_size = self.layout.as_ref().and_then(|l| l.page_size_of(page)).unwrap_or(0) as usize;
                let (bytes, filled) =
                    self.placed.entry(page.0).or_insert_with(|| (vec![0; page_size], vec![false; page_size]));
                let (start, end) = (offset as usize, offset as usize + data.len());
                match (bytes.get_mut(start..end), filled.get_mut(start..end)) {
                    (Some(room), Some(marks)) => {
                        room.copy_from_slice(&data);
                        marks.fill(true);
                    }
                    _ => self.violations.push(Violation::HalfFilledPage {
                        page: page.0,
                        bytes: end as u64,
                        page_size: page_size as u32,
                    }),
                }
            }
            DestinationAction::InstallPlacedPage { page } => {
                // Visible only once every byte of it was placed.
                let page_size = self.layout.as_ref().and_then(|l| l.page_size_of(page)).unwrap_or(0);
                let (bytes, filled) = self.placed.remove(&page.0).unwrap_or_default();
                let have = filled.iter().filter(|&&f| f).count() as u64;
                if have != u64::from(page_size) || bytes.len() != page_size as usize {
                    self.violations.push(Violation::HalfFilledPage { page: page.0, bytes: have, page_size });
                    return;
                }
                self.apply(
                    now,
                    DestinationAction::InstallPage { page, data: PageData::Bytes(bytes.into()), overwrite: false },
                );
            }
            DestinationAction::InstallPage { page, data, overwrite } => {
                // A page becomes visible whole: all of its block's page size.
                let page_size = self.layout.as_ref().and_then(|l| l.page_size_of(page)).unwrap_or(0);
                if let PageData::Bytes(bytes) = &data {
                    if bytes.len() != page_size as usize {
                        let bytes = bytes.len() as u64;
                        self.violations.push(Violation::HalfFilledPage { page: page.0, bytes, page_size });
                        return;
                    }
                }
                let version = match &data {
                    PageData::Zero => Some(0),
                    PageData::Bytes(bytes) => page_version(bytes, page),
                };
                let Some(version) = version else {
                    self.violations.push(Violation::CorruptPage { page: page.0 });
                    return;
                };
                let slot = &mut self.memory[page.0 as usize];
                if slot.is_some() && !overwrite {
                    // The kernel refuses this (EEXIST); the core must never ask.
                    self.violations.push(Violation::InstallOverPresent { page: page.0 });
                    return;
                }
                *slot = Some(version);
            }
            DestinationAction::DiscardPages { first, count } => {
                for page in first.0..first.0 + count {
                    self.memory[page as usize] = None;
                }
            }
            DestinationAction::LoadDeviceState(state) => {
                if state != self.expected_device_state {
                    self.violations.push(Violation::DeviceStateMismatch);
                }
                self.loading = true;
                for &page in &self.device_pages {
                    if self.memory.get(page.0 as usize).is_some_and(|v| v.is_none()) {
                        if let Err(error) = self.core.handle_page_fault(now, page, Waiter::Vmm) {
                            self.violations.push(Violation::DriverEvent { error: error.to_string() });
                        }
                    }
                }
            }
            DestinationAction::ResumeVcpus => self.running = true,
            DestinationAction::FenceVcpus => self.running = false,
            DestinationAction::DiscardGuest => {
                self.running = false;
                self.placed.clear();
                self.memory.iter_mut().for_each(|v| *v = None);
            }
            DestinationAction::TakeCheckpoint { seq } => self.take_checkpoint(now, seq),
            DestinationAction::Wake(_) => {}
            DestinationAction::Close(channel) => self.links.close.push((channel, None)),
            DestinationAction::Farewell { channel, bytes } => self.links.close.push((channel, Some(bytes))),
            DestinationAction::PromoteConnection(id) => self.links.promote.push(id),
            DestinationAction::CloseConnection(id) => self.links.close_provisional.push(id),
            DestinationAction::Notice(_) => {}
            DestinationAction::Finished(finished) => {
                self.finished_ok = Some(finished.result.is_ok());
                if finished.result.is_err() {
                    // The driver discards a guest that never ran here.
                    self.memory.iter_mut().for_each(|v| *v = None);
                    self.running = false;
                }
                self.finished.0 = Some(*finished);
            }
        }
    }

    /// The driver's checkpoint: every page dirtied since the previous one,
    /// read from memory at this instant, and a device state naming it.
    fn take_checkpoint(&mut self, now: Timestamp, seq: u64) {
        if self.abandon_checkpoints > 0 {
            self.abandon_checkpoints -= 1;
            self.abandoned = Some(seq);
            // The driver failed after reading and clearing the dirty log:
            // it carries those pages into the next checkpoint (here they
            // simply stay in the dirty log).
            if planted!(self.core.config(), AbandonedCheckpointForgetsPages) {
                self.dirty.clear_all();
            }
            self.core.handle_checkpoint_abandoned(now, seq);
            return;
        }
        let mut pages = Vec::new();
        for page in (0..self.dirty.len()).filter(|&p| self.dirty.get(p)) {
            let page = PageNumber(page);
            let Some(version) = self.memory.get(page.0 as usize).copied().flatten() else { continue };
            let size = self.layout.as_ref().and_then(|l| l.page_size_of(page)).unwrap_or(0) as usize;
            let data = if version == 0 {
                PageData::Zero
            } else {
                let mut bytes = vec![0; size];
                fill_page(&mut bytes, page, version);
                PageData::Bytes(Bytes::from(bytes))
            };
            pages.push((page, data));
        }
        self.dirty.clear_all();
        self.checkpoints_taken.push(seq);
        if let Err(error) = self.core.handle_checkpoint(now, seq, checkpoint_device_state(seq), pages) {
            self.violations.push(Violation::DriverEvent { error: error.to_string() });
        }
    }

    /// Finishes a device-state load whose pages are all present.
    fn try_finish_loading(&mut self, now: Timestamp) -> bool {
        if !self.loading || !self.device_pages.iter().all(|&p| self.is_present(p)) {
            return false;
        }
        self.loading = false;
        if let Err(error) = self.core.handle_device_state_loaded(now, Ok(())) {
            self.violations.push(Violation::DriverEvent { error: error.to_string() });
        }
        true
    }
}

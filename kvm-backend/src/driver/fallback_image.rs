//! Fallback on the source: the image the guest restarts from if the
//! destination is lost (docs/fallback.md). It is the guest's memory here:
//! the checkpoint being received is written into it as its pages arrive,
//! and what each page held before is kept in an undo log until the
//! checkpoint is whole, so that one cut off is undone (the image back at
//! the last commit) and a commit costs nothing.
//!
//! The core asks for those writes under its lock, in its order; copying
//! the pages there held the lock for tens of microseconds per read of the
//! return path, and the push's writer, which takes the same lock for every
//! step, waited about 120 ms of a 1.2 s migration of 1 GiB. So the writes
//! are queued under the core's lock (a few words each, the pages' bytes
//! shared with the received frames) and carried out after it is released,
//! in order, by whichever thread queued into an empty queue, or by a
//! reader of the image ([`FallbackImage::carry_out`] first).

use std::sync::{Arc, Mutex};

use postcopy_core::wire::PageData;
use postcopy_core::PageNumber;

use super::report::{CheckpointCounters, FallbackRecord};
use crate::devices::lock;

/// Pages of guest memory, read and written whole (the image's view).
pub(super) trait PageStore {
    fn read(&self, page: PageNumber, out: &mut [u8]) -> Result<(), String>;
    fn write(&self, page: PageNumber, data: &[u8]) -> Result<(), String>;
}

/// A write to the image the core asked for, not yet carried out.
#[derive(Debug)]
pub(super) enum ImageWrite {
    /// A page of checkpoint `seq`: into the image, keeping what it held.
    Page { seq: u64, page: PageNumber, data: PageData },
    /// Checkpoint `seq` is whole: forget what its pages overwrote.
    Commit { seq: u64 },
    /// Checkpoint `seq` was cut off: put back what its pages overwrote.
    Discard { seq: u64 },
}

/// The fallback image's pending writes and undo log.
#[derive(Debug)]
pub(super) struct FallbackImage {
    /// Writes in the core's order, queued under its lock.
    queued: Mutex<Vec<ImageWrite>>,
    /// Held while carrying writes out, so that batches taken from the
    /// queue one after the other are carried out in that order.
    undo: Mutex<UndoLog>,
    /// A page of zeros, written for a checkpoint's zero pages.
    zero_page: Vec<u8>,
    /// What was committed and discarded, as it happens.
    counters: Arc<CheckpointCounters>,
}

impl FallbackImage {
    /// An image whose undo log starts in `reserved` (memory touched ahead:
    /// fresh memory costs up to 10-30 us a page here while a guest runs),
    /// of pages of `page_bytes`, counting its commits and discards in
    /// `counters`.
    pub(super) fn new(reserved: Vec<u8>, page_bytes: usize, counters: Arc<CheckpointCounters>) -> Self {
        Self {
            queued: Mutex::new(Vec::new()),
            undo: Mutex::new(UndoLog { old: reserved, ..UndoLog::default() }),
            zero_page: vec![0; page_bytes],
            counters,
        }
    }

    /// Queues a write (under the core's lock). Returns true when the queue
    /// was empty: the caller then calls [`Self::carry_out`] once the core's
    /// lock is released (a write queued behind others is carried out with
    /// them).
    pub(super) fn queue(&self, write: ImageWrite) -> bool {
        let mut queued = lock(&self.queued);
        queued.push(write);
        queued.len() == 1
    }

    /// Carries out every write queued so far, in order. Also the way to
    /// read the image as the core last left it (a takeover, the end).
    pub(super) fn carry_out(&self, ram: &impl PageStore) {
        let mut undo = lock(&self.undo);
        let mut batch = Vec::new();
        loop {
            std::mem::swap(&mut batch, &mut *lock(&self.queued));
            if batch.is_empty() {
                return;
            }
            for write in batch.drain(..) {
                self.carry_out_one(&mut undo, ram, write);
            }
        }
    }

    fn carry_out_one(&self, undo: &mut UndoLog, ram: &impl PageStore, write: ImageWrite) {
        match write {
            ImageWrite::Page { seq, page, data } => {
                if undo.is_empty() {
                    tracing::info!(seq, "checkpoint {seq} arriving");
                }
                let (data, zero) = match &data {
                    PageData::Bytes(bytes) => (bytes.as_ref(), false),
                    PageData::Zero => (self.zero_page.as_slice(), true),
                };
                if let Err(e) = undo.overwrite(ram, page, data, zero) {
                    // The core checked the page's number and length against the layout.
                    tracing::error!(seq, page = page.0, e, "cannot write a checkpoint page into the image");
                }
            }
            ImageWrite::Commit { seq } => {
                let (pages, bytes) = undo.commit();
                self.counters.count_committed(pages, bytes);
                tracing::debug!(seq, pages, bytes, "checkpoint committed");
            }
            ImageWrite::Discard { seq } => {
                match undo.undo(ram, self.zero_page.len()) {
                    Ok(pages) => tracing::info!(seq, pages, "a checkpoint cut off: undone"),
                    Err(e) => tracing::error!(seq, e, "cannot undo a checkpoint cut off: the image is damaged"),
                }
                self.counters.count_discarded();
            }
        }
    }

    /// The migration is over: carries out what is queued, undoes a
    /// checkpoint the core never saw end, and returns what was committed
    /// and discarded and the undo log's memory (kept for the next
    /// migration).
    pub(super) fn finish(&self, ram: &impl PageStore) -> (FallbackRecord, Vec<u8>) {
        self.carry_out(ram);
        let mut undo = lock(&self.undo);
        if !undo.is_empty() {
            let undone = undo.undo(ram, self.zero_page.len());
            tracing::warn!(?undone, "the migration ended in the middle of a checkpoint: undone");
        }
        (self.counters.record(), std::mem::take(&mut undo.old))
    }
}

/// What the checkpoint being received overwrote in the image. Staging the
/// pages apart instead and copying them into the image at the commit took
/// a second copy of each page (7-48 ms per checkpoint) and two staging
/// areas.
#[derive(Debug, Default)]
struct UndoLog {
    /// The pages overwritten, in order; page `i`'s old contents are at
    /// `i * page_bytes` in `old`.
    pages: Vec<PageNumber>,
    old: Vec<u8>,
    /// Bytes of the non-zero pages written.
    bytes: u64,
}

impl UndoLog {
    fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Keeps what `page` holds, then writes `data` over it (a page of
    /// zeros if `zero`, counted as no bytes).
    fn overwrite(&mut self, ram: &impl PageStore, page: PageNumber, data: &[u8], zero: bool) -> Result<(), String> {
        let page_bytes = data.len();
        let start = self.pages.len() * page_bytes;
        if self.old.len() < start + page_bytes {
            // Past the reserved memory: fresh memory from here on.
            let grown = (start + page_bytes).max(self.old.len().saturating_mul(2));
            self.old.resize(grown, 0);
        }
        ram.read(page, &mut self.old[start..start + page_bytes])?;
        ram.write(page, data)?;
        self.pages.push(page);
        if !zero {
            self.bytes += page_bytes as u64;
        }
        Ok(())
    }

    /// The checkpoint is whole: its pages stay; returns how many, and the
    /// bytes of those not zero.
    fn commit(&mut self) -> (u64, u64) {
        let n = self.pages.len() as u64;
        self.pages.clear();
        (n, std::mem::take(&mut self.bytes))
    }

    /// The checkpoint was cut off: puts back what its pages overwrote
    /// (last first, should a page come twice); returns how many.
    fn undo(&mut self, ram: &impl PageStore, page_bytes: usize) -> Result<usize, String> {
        let n = self.pages.len();
        for (i, page) in self.pages.iter().enumerate().rev() {
            ram.write(*page, &self.old[i * page_bytes..(i + 1) * page_bytes])?;
        }
        self.pages.clear();
        self.bytes = 0;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::cell::RefCell;

    /// Guest memory of a few small pages.
    struct Pages(RefCell<Vec<Vec<u8>>>);

    impl PageStore for Pages {
        fn read(&self, page: PageNumber, out: &mut [u8]) -> Result<(), String> {
            let pages = self.0.borrow();
            out.copy_from_slice(pages.get(page.0 as usize).ok_or("outside")?);
            Ok(())
        }

        fn write(&self, page: PageNumber, data: &[u8]) -> Result<(), String> {
            let mut pages = self.0.borrow_mut();
            pages.get_mut(page.0 as usize).ok_or("outside")?.copy_from_slice(data);
            Ok(())
        }
    }

    fn contents(ram: &Pages) -> Vec<u8> {
        ram.0.borrow().iter().map(|p| p[0]).collect()
    }

    fn ram() -> Pages {
        Pages(RefCell::new((0..4).map(|i| vec![i as u8; 8]).collect()))
    }

    #[test]
    fn a_checkpoint_is_written_in_place_and_undone_if_cut_off() {
        let ram = ram();
        // Room for one page reserved: the second grows it.
        let mut undo = UndoLog { old: vec![0xee; 8], ..UndoLog::default() };
        undo.overwrite(&ram, PageNumber(1), &[7; 8], false).unwrap();
        undo.overwrite(&ram, PageNumber(3), &[0; 8], true).unwrap();
        assert_eq!(contents(&ram), vec![0, 7, 2, 0]);
        assert_eq!(undo.commit(), (2, 8));
        assert!(undo.is_empty());
        // The next one, cut off: the image is back at the commit. A page
        // that came twice gets its contents from before the first.
        undo.overwrite(&ram, PageNumber(0), &[5; 8], false).unwrap();
        undo.overwrite(&ram, PageNumber(1), &[6; 8], false).unwrap();
        undo.overwrite(&ram, PageNumber(1), &[8; 8], false).unwrap();
        assert_eq!(contents(&ram), vec![5, 8, 2, 0]);
        assert_eq!(undo.undo(&ram, 8), Ok(3));
        assert_eq!(contents(&ram), vec![0, 7, 2, 0]);
        assert_eq!(undo.commit(), (0, 0));
        // A page outside the guest is refused before anything changes.
        assert!(undo.overwrite(&ram, PageNumber(9), &[1; 8], false).is_err());
        assert!(undo.is_empty());
    }

    fn page(seq: u64, page: u64, byte: u8) -> ImageWrite {
        ImageWrite::Page { seq, page: PageNumber(page), data: PageData::Bytes(Bytes::from(vec![byte; 8])) }
    }

    #[test]
    fn queued_writes_are_carried_out_later_in_the_cores_order() {
        let ram = ram();
        let counters = Arc::new(CheckpointCounters::default());
        let image = FallbackImage::new(Vec::new(), 8, counters.clone());
        // Only the first write into an empty queue asks for a carry-out.
        assert!(image.queue(page(1, 1, 7)));
        assert!(!image.queue(ImageWrite::Page { seq: 1, page: PageNumber(3), data: PageData::Zero }));
        assert!(!image.queue(ImageWrite::Commit { seq: 1 }));
        // Nothing happens under the core's lock.
        assert_eq!(contents(&ram), vec![0, 1, 2, 3]);
        // The next checkpoint's pages are queued before the carry-out: the
        // commit of the first still covers only its own pages.
        assert!(!image.queue(page(2, 0, 5)));
        assert!(!image.queue(page(2, 1, 6)));
        image.carry_out(&ram);
        assert_eq!(contents(&ram), vec![5, 6, 2, 0]);
        assert_eq!(counters.record().checkpoints_committed, 1, "counted as carried out");
        assert!(image.queue(ImageWrite::Discard { seq: 2 }));
        image.carry_out(&ram);
        assert_eq!(contents(&ram), vec![0, 7, 2, 0], "checkpoint 2 undone, 1 kept");
        // A partial checkpoint queued when the migration ends is undone.
        assert!(image.queue(page(3, 2, 9)));
        let (record, _memory) = image.finish(&ram);
        assert_eq!(contents(&ram), vec![0, 7, 2, 0]);
        assert_eq!(
            (
                record.checkpoints_committed,
                record.checkpoint_pages,
                record.checkpoint_bytes,
                record.checkpoints_discarded
            ),
            (1, 2, 8, 1)
        );
    }
}

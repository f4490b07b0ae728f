//! Which offsets of a partition may be committed: only those below the first record not
//! yet handled. Records may finish out of order (concurrency by key), so the tracker keeps
//! the in-flight offsets in dispatch order and advances over the completed prefix.

use std::collections::VecDeque;

/// Contiguous completed offsets of one partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// In-flight offsets in increasing order, with whether each is done.
    in_flight: VecDeque<(i64, bool)>,
    /// The next offset to commit (one past the last contiguously completed record).
    committable: Option<i64>,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was handed to a handler. Offsets must increase; an offset
    /// not above the last one is ignored (a re-delivery after a seek is tracked anew only
    /// after [`reset`](Self::reset)).
    pub fn started(&mut self, offset: i64) {
        if let Some(&(last, _)) = self.in_flight.back()
            && offset <= last
        {
            return;
        }
        self.in_flight.push_back((offset, false));
    }

    /// Records that `offset` was handled (or dead-lettered). Returns the new committable
    /// offset if it advanced.
    pub fn completed(&mut self, offset: i64) -> Option<i64> {
        // Records handled in order complete the oldest one: no search.
        let i = match self.in_flight.front() {
            Some(&(o, _)) if o == offset => 0,
            _ => self
                .in_flight
                .binary_search_by_key(&offset, |&(o, _)| o)
                .ok()?,
        };
        self.in_flight[i].1 = true;
        let mut advanced = None;
        while let Some(&(o, true)) = self.in_flight.front() {
            self.in_flight.pop_front();
            advanced = Some(o + 1);
        }
        if advanced.is_some() {
            self.committable = advanced;
        }
        advanced
    }

    /// The offset to commit: one past the last record of the completed prefix.
    pub fn committable(&self) -> Option<i64> {
        self.committable
    }

    /// Records started but not completed.
    pub fn pending(&self) -> usize {
        self.in_flight.iter().filter(|(_, done)| !done).count()
    }

    /// Forgets the in-flight records (they will be re-delivered); keeps the committable offset.
    pub fn reset(&mut self) {
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_completion_advances_one_by_one() {
        let mut t = OffsetTracker::new();
        for o in 10..13 {
            t.started(o);
        }
        assert_eq!(t.committable(), None);
        assert_eq!(t.completed(10), Some(11));
        assert_eq!(t.completed(11), Some(12));
        assert_eq!(t.pending(), 1);
    }

    #[test]
    fn out_of_order_completion_waits_for_the_gap() {
        let mut t = OffsetTracker::new();
        for o in [5, 6, 9, 10] {
            t.started(o); // 7 and 8 are not records (compaction, transaction markers)
        }
        assert_eq!(t.completed(9), None);
        assert_eq!(t.completed(6), None);
        assert_eq!(t.committable(), None);
        assert_eq!(t.completed(5), Some(10));
        assert_eq!(t.completed(10), Some(11));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn unknown_and_stale_offsets_are_ignored() {
        let mut t = OffsetTracker::new();
        t.started(3);
        t.started(2);
        assert_eq!(t.completed(2), None);
        assert_eq!(t.completed(4), None);
        assert_eq!(t.completed(3), Some(4));
        t.started(4);
        t.reset();
        assert_eq!(t.committable(), Some(4));
        assert_eq!(t.pending(), 0);
    }
}

//! Lag arithmetic: how many records of a partition a group has yet to process.

/// Where a group without a committed offset starts reading (the consumer's
/// `auto.offset.reset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetReset {
    /// From the first record still stored.
    Earliest,
    /// From records produced after it joins.
    Latest,
}

/// What Kafka says about one partition, for one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// Log-start offset: the first record still stored (retention and DeleteRecords
    /// move it up).
    pub start: i64,
    /// Last stable offset (read_committed end): records of open transactions are not
    /// processable yet, so they are not lag yet.
    pub end: i64,
    /// The group's committed offset, the next record it will process; `None` when it
    /// has never committed.
    pub committed: Option<i64>,
}

/// Records the group has yet to read from the partition:
/// - no committed offset: per `reset`, everything stored (`end − start`, not
///   `end − 0`: deleted records will never be read) or nothing;
/// - committed offset before log-start (records deleted by retention before they were
///   processed): the consumer resumes at log-start, so `end − start`;
/// - otherwise `end − committed`; never negative (a commit can be ahead of a stale end).
///
/// Transaction markers and compacted-away records still count here; see
/// [`crate::autoscaler::offsets::Probe`] for how the loop recognises them.
pub fn lag(o: Offsets, reset: OffsetReset) -> i64 {
    let from = match (o.committed, reset) {
        (None, OffsetReset::Earliest) => o.start,
        (None, OffsetReset::Latest) => o.end,
        (Some(c), _) => c.max(o.start),
    };
    (o.end - from).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use OffsetReset::*;

    #[test]
    fn lag_table() {
        let o = |start, end, committed| Offsets {
            start,
            end,
            committed,
        };
        #[rustfmt::skip]
        let cases = [
            // what, offsets, reset, lag
            ("committed in range", o(0, 100, Some(40)), Earliest, 60),
            ("drained", o(0, 100, Some(100)), Earliest, 0),
            ("new group, earliest, nothing deleted", o(0, 100, None), Earliest, 100),
            ("new group, earliest, records deleted", o(70, 100, None), Earliest, 30),
            ("new group, latest", o(70, 100, None), Latest, 0),
            ("committed behind log-start", o(70, 100, Some(10)), Earliest, 30),
            ("committed behind log-start, latest", o(70, 100, Some(10)), Latest, 30),
            ("committed ahead of a stale end", o(0, 100, Some(105)), Earliest, 0),
            ("empty partition", o(0, 0, None), Earliest, 0),
            ("everything deleted", o(100, 100, Some(3)), Earliest, 0),
        ];
        for (what, offsets, reset, want) in cases {
            assert_eq!(lag(offsets, reset), want, "{what}");
        }
    }
}

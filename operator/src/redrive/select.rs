//! Which dead-letter records a Redrive moves, where to, and with which headers (pure).
//!
//! The provenance headers are the ones Spring Kafka's `DeadLetterPublishingRecoverer`
//! writes and the consumer runtime writes the same way: `kafka_dlt-original-topic` as
//! UTF-8, `kafka_dlt-original-partition` as a 4-byte and `kafka_dlt-original-offset` as
//! an 8-byte big-endian integer, `kafka_dlt-exception-fqcn` as UTF-8.

use std::collections::BTreeMap;

use eventops_crds::{REDRIVEN_FROM_HEADER, RedriveFilter, RedriveSample};

/// Header naming the topic a dead-lettered record came from.
pub const ORIGINAL_TOPIC: &str = "kafka_dlt-original-topic";
/// Header with the partition it came from.
pub const ORIGINAL_PARTITION: &str = "kafka_dlt-original-partition";
/// Header with the offset it had there.
pub const ORIGINAL_OFFSET: &str = "kafka_dlt-original-offset";
/// Header with the exception's class.
pub const EXCEPTION_FQCN: &str = "kafka_dlt-exception-fqcn";
/// Header with the exception's cause's class.
pub const EXCEPTION_CAUSE_FQCN: &str = "kafka_dlt-exception-cause-fqcn";
/// Header with the exception's message.
pub const EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";

/// Header prefixes a redriven record drops: dead-letter provenance (Spring's and the
/// runtime's), Spring's retry-topic bookkeeping and the runtime's, and an earlier
/// redrive's mark (a record carries one `eventops-redriven-from`, the latest).
const DROPPED_PREFIXES: &[&str] = &[
    "kafka_dlt-",
    "retry_topic-",
    "eventops-retry-",
    REDRIVEN_FROM_HEADER,
];

/// A dead-letter record, as the selection sees it.
#[derive(Clone, Copy, Debug)]
pub struct DltRecord<'a> {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in it.
    pub offset: i64,
    /// The record's timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// The record's key.
    pub key: Option<&'a [u8]>,
    /// Its headers, in order.
    pub headers: &'a [(String, Option<Vec<u8>>)],
}

impl DltRecord<'_> {
    /// The last value of header `name` (Kafka allows repeats; Spring reads the last).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn header_text(&self, name: &str) -> Option<String> {
        self.header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The topic, partition and offset it came from, when its headers say.
    pub fn origin(&self) -> Option<(String, Option<i32>, Option<i64>)> {
        let topic = self.header_text(ORIGINAL_TOPIC)?;
        let partition = self
            .header(ORIGINAL_PARTITION)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(i32::from_be_bytes);
        let offset = self
            .header(ORIGINAL_OFFSET)
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(i64::from_be_bytes);
        Some((topic, partition, offset))
    }
}

/// The filter, with times resolved to milliseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    /// Earliest dead-letter timestamp, inclusive.
    pub after_ms: Option<i64>,
    /// Latest dead-letter timestamp, exclusive.
    pub before_ms: Option<i64>,
    /// Exception class, fully qualified or simple.
    pub exception_class: Option<String>,
    /// Exact key.
    pub key: Option<String>,
    /// Header name and, optionally, value.
    pub header: Option<(String, Option<String>)>,
}

impl From<&RedriveFilter> for Filter {
    fn from(f: &RedriveFilter) -> Self {
        Self {
            after_ms: f.after.as_ref().map(|t| t.0.as_millisecond()),
            before_ms: f.before.as_ref().map(|t| t.0.as_millisecond()),
            exception_class: f.exception_class.clone(),
            key: f.key.clone(),
            header: f.header.as_ref().map(|h| (h.name.clone(), h.value.clone())),
        }
    }
}

impl Filter {
    /// Whether `r` meets every condition.
    pub fn matches(&self, r: &DltRecord<'_>) -> bool {
        let time_ok = |bound: Option<i64>, ok: fn(i64, i64) -> bool| match bound {
            None => true,
            Some(b) => r.timestamp_ms.is_some_and(|t| ok(t, b)),
        };
        if !time_ok(self.after_ms, |t, b| t >= b) || !time_ok(self.before_ms, |t, b| t < b) {
            return false;
        }
        if let Some(class) = &self.exception_class {
            let named = |h| {
                r.header(h).is_some_and(|v| {
                    let fqcn = String::from_utf8_lossy(v);
                    fqcn == class.as_str() || fqcn.rsplit('.').next() == Some(class.as_str())
                })
            };
            if !named(EXCEPTION_FQCN) && !named(EXCEPTION_CAUSE_FQCN) {
                return false;
            }
        }
        if let Some(key) = &self.key
            && r.key != Some(key.as_bytes())
        {
            return false;
        }
        if let Some((name, value)) = &self.header {
            let found = match value {
                None => r.headers.iter().any(|(n, _)| n == name),
                Some(value) => r
                    .headers
                    .iter()
                    .any(|(n, v)| n == name && v.as_deref() == Some(value.as_bytes())),
            };
            if !found {
                return false;
            }
        }
        true
    }
}

/// Where matched records go.
#[derive(Clone, Debug, PartialEq)]
pub enum Destination {
    /// Every record to this topic, which has this many partitions.
    Fixed {
        /// Kafka topic.
        topic: String,
        /// Its partitions.
        partitions: i32,
    },
    /// Each record back to the topic its `kafka_dlt-original-topic` names, if it is one
    /// of these (the topics EventTopics of the namespace own, with their partitions).
    Original(BTreeMap<String, i32>),
}

/// What happens to one dead-letter record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It does not match the filter: it stays and is not counted.
    NotMatched,
    /// It matches but has nowhere it may go: it stays, counted as skipped.
    Skip,
    /// It goes to `topic`: to `partition` when set (back where it was), otherwise where
    /// the producer's partitioner puts its key.
    Move {
        /// Kafka topic.
        topic: String,
        /// Partition, when it returns to the one it came from.
        partition: Option<i32>,
    },
}

/// What to do with `r`.
pub fn decide(r: &DltRecord<'_>, filter: &Filter, destination: &Destination) -> Verdict {
    if !filter.matches(r) {
        return Verdict::NotMatched;
    }
    let origin = r.origin();
    // Back to the partition it came from when it goes back to its own topic: its key
    // then lands where the original producer's partitioner put it, whatever that was.
    let same_partition = |topic: &str, partitions: i32| {
        origin
            .as_ref()
            .filter(|(t, _, _)| t == topic)
            .and_then(|(_, p, _)| *p)
            .filter(|p| (0..partitions).contains(p))
    };
    match destination {
        Destination::Fixed { topic, partitions } => Verdict::Move {
            topic: topic.clone(),
            partition: same_partition(topic, *partitions),
        },
        Destination::Original(owned) => match origin.as_ref().map(|(t, _, _)| t) {
            Some(topic) => match owned.get(topic) {
                Some(&partitions) => Verdict::Move {
                    topic: topic.clone(),
                    partition: same_partition(topic, partitions),
                },
                None => Verdict::Skip,
            },
            None => Verdict::Skip,
        },
    }
}

/// The headers a moved record carries: `r`'s, without the dead-letter and retry ones,
/// plus `eventops-redriven-from: <dlt>/<partition>/<offset>`.
pub fn moved_headers(r: &DltRecord<'_>, dlt: &str) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out: Vec<(String, Option<Vec<u8>>)> = r
        .headers
        .iter()
        .filter(|(n, _)| !DROPPED_PREFIXES.iter().any(|p| n.starts_with(p)))
        .cloned()
        .collect();
    out.push((
        REDRIVEN_FROM_HEADER.to_string(),
        Some(format!("{dlt}/{}/{}", r.partition, r.offset).into_bytes()),
    ));
    out
}

/// A dry run's view of `r`.
pub fn sample(r: &DltRecord<'_>, verdict: &Verdict) -> RedriveSample {
    let message: Option<String> = r
        .header_text(EXCEPTION_MESSAGE)
        .map(|m| m.chars().take(200).collect());
    RedriveSample {
        partition: r.partition,
        offset: r.offset,
        key: r.key.map(|k| String::from_utf8_lossy(k).into_owned()),
        origin: r.origin().map(|(t, p, o)| {
            let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
            format!(
                "{t}/{}/{}",
                show(p.map(|p| p.to_string())),
                show(o.map(|o| o.to_string()))
            )
        }),
        destination: match verdict {
            Verdict::Move { topic, .. } => Some(topic.clone()),
            _ => None,
        },
        // Spring (and the runtime, as Spring does) wraps the listener's exception in
        // ListenerExecutionFailedException: the cause is the one that says something.
        exception: r
            .header_text(EXCEPTION_CAUSE_FQCN)
            .or_else(|| r.header_text(EXCEPTION_FQCN)),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &[u8]) -> (String, Option<Vec<u8>>) {
        (name.to_string(), Some(value.to_vec()))
    }

    /// Headers as Spring's recoverer writes them for orders/2/41.
    fn spring_headers(exception: &str) -> Vec<(String, Option<Vec<u8>>)> {
        vec![
            h("eventops-correlation-id", b"c-1"),
            h(ORIGINAL_TOPIC, b"orders"),
            h(ORIGINAL_PARTITION, &2i32.to_be_bytes()),
            h(ORIGINAL_OFFSET, &41i64.to_be_bytes()),
            h(EXCEPTION_FQCN, exception.as_bytes()),
            h(EXCEPTION_MESSAGE, b"total is negative"),
            h("retry_topic-attempts", &3i32.to_be_bytes()),
        ]
    }

    fn record<'a>(headers: &'a [(String, Option<Vec<u8>>)], key: &'a [u8]) -> DltRecord<'a> {
        DltRecord {
            partition: 1,
            offset: 7,
            timestamp_ms: Some(1_000),
            key: Some(key),
            headers,
        }
    }

    fn owned(topics: &[(&str, i32)]) -> Destination {
        Destination::Original(topics.iter().map(|(t, p)| (t.to_string(), *p)).collect())
    }

    #[test]
    fn goes_back_to_its_original_topic_and_partition() {
        let headers = spring_headers("java.lang.IllegalStateException");
        let r = record(&headers, b"order-1");
        assert_eq!(
            decide(&r, &Filter::default(), &owned(&[("orders", 6)])),
            Verdict::Move {
                topic: "orders".into(),
                partition: Some(2)
            }
        );
        // The topic shrank below the partition (it cannot, but a different topic may
        // have fewer): the partitioner chooses.
        assert_eq!(
            decide(&r, &Filter::default(), &owned(&[("orders", 2)])),
            Verdict::Move {
                topic: "orders".into(),
                partition: None
            }
        );
    }

    #[test]
    fn an_origin_the_namespace_does_not_own_or_none_is_skipped() {
        let headers = spring_headers("x.Y");
        let r = record(&headers, b"k");
        assert_eq!(
            decide(&r, &Filter::default(), &owned(&[("payments", 6)])),
            Verdict::Skip
        );
        let none: Vec<(String, Option<Vec<u8>>)> = vec![h("a", b"b")];
        assert_eq!(
            decide(
                &record(&none, b"k"),
                &Filter::default(),
                &owned(&[("orders", 6)])
            ),
            Verdict::Skip
        );
    }

    #[test]
    fn a_fixed_destination_takes_every_match_and_keeps_the_partition_only_for_its_own_topic() {
        let headers = spring_headers("x.Y");
        let r = record(&headers, b"k");
        let to = |topic: &str| Destination::Fixed {
            topic: topic.into(),
            partitions: 6,
        };
        assert_eq!(
            decide(&r, &Filter::default(), &to("orders-v2")),
            Verdict::Move {
                topic: "orders-v2".into(),
                partition: None
            }
        );
        assert_eq!(
            decide(&r, &Filter::default(), &to("orders")),
            Verdict::Move {
                topic: "orders".into(),
                partition: Some(2)
            }
        );
    }

    #[test]
    fn filters_by_time_exception_key_and_header() {
        let headers = spring_headers("com.shop.PaymentDeclined");
        let r = record(&headers, b"order-1");
        let d = owned(&[("orders", 6)]);
        let moved = |f: Filter| decide(&r, &f, &d) != Verdict::NotMatched;
        assert!(moved(Filter {
            after_ms: Some(1_000),
            before_ms: Some(1_001),
            ..Default::default()
        }));
        assert!(!moved(Filter {
            after_ms: Some(1_001),
            ..Default::default()
        }));
        assert!(!moved(Filter {
            before_ms: Some(1_000),
            ..Default::default()
        }));
        for class in ["com.shop.PaymentDeclined", "PaymentDeclined"] {
            assert!(moved(Filter {
                exception_class: Some(class.into()),
                ..Default::default()
            }));
        }
        assert!(!moved(Filter {
            exception_class: Some("Declined".into()),
            ..Default::default()
        }));
        assert!(moved(Filter {
            key: Some("order-1".into()),
            ..Default::default()
        }));
        assert!(!moved(Filter {
            key: Some("order-2".into()),
            ..Default::default()
        }));
        assert!(moved(Filter {
            header: Some(("eventops-correlation-id".into(), Some("c-1".into()))),
            ..Default::default()
        }));
        assert!(moved(Filter {
            header: Some(("eventops-correlation-id".into(), None)),
            ..Default::default()
        }));
        assert!(!moved(Filter {
            header: Some(("eventops-correlation-id".into(), Some("c-2".into()))),
            ..Default::default()
        }));
        // A record without a timestamp is outside every time range.
        let untimed = DltRecord {
            timestamp_ms: None,
            ..r
        };
        let f = Filter {
            after_ms: Some(0),
            ..Default::default()
        };
        assert_eq!(decide(&untimed, &f, &d), Verdict::NotMatched);
    }

    #[test]
    fn the_cause_class_matches_too() {
        let mut headers =
            spring_headers("org.springframework.kafka.listener.ListenerExecutionFailedException");
        headers.push(h(EXCEPTION_CAUSE_FQCN, b"com.shop.PaymentDeclined"));
        let r = record(&headers, b"k");
        let f = Filter {
            exception_class: Some("PaymentDeclined".into()),
            ..Default::default()
        };
        assert!(f.matches(&r));
    }

    #[test]
    fn moved_records_drop_dead_letter_and_retry_headers_and_say_where_they_came_from() {
        let mut headers = spring_headers("x.Y");
        headers.push(h("eventops-retry-attempt", b"2"));
        headers.push(h(REDRIVEN_FROM_HEADER, b"orders.DLT/0/3"));
        let r = record(&headers, b"k");
        let out = moved_headers(&r, "orders.DLT");
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["eventops-correlation-id", REDRIVEN_FROM_HEADER]);
        assert_eq!(out[1].1.as_deref(), Some(&b"orders.DLT/1/7"[..]));
    }

    #[test]
    fn a_sample_decodes_the_provenance() {
        let headers = spring_headers("java.lang.IllegalStateException");
        let r = record(&headers, b"order-1");
        let verdict = decide(&r, &Filter::default(), &owned(&[("orders", 6)]));
        let s = sample(&r, &verdict);
        assert_eq!(s.origin.as_deref(), Some("orders/2/41"));
        assert_eq!(s.destination.as_deref(), Some("orders"));
        assert_eq!(
            s.exception.as_deref(),
            Some("java.lang.IllegalStateException")
        );
        assert_eq!(s.message.as_deref(), Some("total is negative"));
        assert_eq!(s.key.as_deref(), Some("order-1"));
        let mut wrapped = headers.clone();
        wrapped.push(h(EXCEPTION_CAUSE_FQCN, b"com.shop.PaymentDeclined"));
        let s = sample(&record(&wrapped, b"k"), &verdict);
        assert_eq!(s.exception.as_deref(), Some("com.shop.PaymentDeclined"));
    }
}

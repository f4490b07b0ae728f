//! Dead-letter records, byte-compatible with Spring Kafka's `DeadLetterPublishingRecoverer`
//! as a Spring listener container drives it: for the same source record and failure, every
//! `kafka_dlt-*` header is byte-equal to Spring's (tested against Spring Kafka 4.x itself in
//! `tests/tests/spring_interop.rs`). Partition as a 4-byte big-endian int, offset and
//! timestamp as 8-byte big-endian longs (`-1` when the record has no timestamp), the
//! timestamp type by Kafka's `TimestampType` names, the rest UTF-8.
//!
//! A Spring container hands the recoverer the listener's exception wrapped in a
//! `ListenerExecutionFailedException` ("Listener failed") that carries the group id. The
//! runtime plays the container and the handler the listener, so its headers say the same:
//! `kafka_dlt-exception-fqcn` is that wrapper, `kafka_dlt-exception-cause-fqcn` the
//! handler error's type name, and the message `Listener failed; <handler message>`. A Spring
//! tool that routes or reports dead letters by their cause treats a Rust worker's records as
//! its own.
//!
//! Earlier exception headers are replaced. Earlier `kafka_dlt-original-*` headers are
//! replaced too when a main topic dead-letters ([`headers`]).
//!
//! Along a retry chain (a route with retry topics: its retry hops and its dead-letter
//! topic, [`retry_hop_headers`]) the headers are those Spring's `@RetryableTopic` chains
//! write, whose recoverer (`DeadLetterPublishingRecovererFactory`) renames them to
//! `KafkaHeaders`' non-DLT names ([`chain`]: `kafka_original-*`, `kafka_exception-*`)
//! and keeps the first origin (`setAppendOriginalHeaders(false)`): a record that went
//! main → retry → DLT names the main topic's record, whichever side wrote each hop.

use crate::error::HandlerError;

/// Topic the failed record was read from.
pub const ORIGINAL_TOPIC: &str = "kafka_dlt-original-topic";
/// Its partition (4-byte big-endian int).
pub const ORIGINAL_PARTITION: &str = "kafka_dlt-original-partition";
/// Its offset (8-byte big-endian long).
pub const ORIGINAL_OFFSET: &str = "kafka_dlt-original-offset";
/// Its timestamp in epoch milliseconds (8-byte big-endian long, `-1` for none).
pub const ORIGINAL_TIMESTAMP: &str = "kafka_dlt-original-timestamp";
/// `CreateTime`, `LogAppendTime` or `NoTimestampType` (Kafka's `TimestampType.name`).
pub const ORIGINAL_TIMESTAMP_TYPE: &str = "kafka_dlt-original-timestamp-type";
/// Consumer group that failed to process it.
pub const ORIGINAL_CONSUMER_GROUP: &str = "kafka_dlt-original-consumer-group";
/// The failure's class name: always [`LISTENER_FAILED_FQCN`], as in Spring.
pub const EXCEPTION_FQCN: &str = "kafka_dlt-exception-fqcn";
/// The handler error's type name (Spring: the listener exception's class name).
pub const EXCEPTION_CAUSE_FQCN: &str = "kafka_dlt-exception-cause-fqcn";
/// `Listener failed; <the handler error's message>`.
pub const EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";
/// The failure in the shape of a Java stack trace without frames: the wrapper's line, then
/// `Caused by: <type>: <message>` and the error's cause chain.
pub const EXCEPTION_STACKTRACE: &str = "kafka_dlt-exception-stacktrace";
/// Prefix of every header above.
pub const PREFIX: &str = "kafka_dlt-";
/// Prefix of the provenance headers (topic, partition, offset, timestamp, group).
pub const ORIGINAL_PREFIX: &str = "kafka_dlt-original-";

/// The headers of a record along a retry chain, named as Spring's `@RetryableTopic`
/// chains name them (`KafkaHeaders.ORIGINAL_*` and `KafkaHeaders.EXCEPTION_*`), with the
/// same encodings as the `kafka_dlt-*` headers above.
pub mod chain {
    /// Topic of the chain's first failed record (the main topic).
    pub const ORIGINAL_TOPIC: &str = "kafka_original-topic";
    /// Its partition (4-byte big-endian int).
    pub const ORIGINAL_PARTITION: &str = "kafka_original-partition";
    /// Its offset (8-byte big-endian long).
    pub const ORIGINAL_OFFSET: &str = "kafka_original-offset";
    /// Its timestamp in epoch milliseconds (8-byte big-endian long).
    pub const ORIGINAL_TIMESTAMP: &str = "kafka_original-timestamp";
    /// Its timestamp type by Kafka's `TimestampType` names.
    pub const ORIGINAL_TIMESTAMP_TYPE: &str = "kafka_original-timestamp-type";
    /// Consumer group that first failed it: Spring's `KafkaHeaders.ORIGINAL_CONSUMER_GROUP`
    /// is the same name as the dead-letter one.
    pub const ORIGINAL_CONSUMER_GROUP: &str = super::ORIGINAL_CONSUMER_GROUP;
    /// The latest failure's class name.
    pub const EXCEPTION_FQCN: &str = "kafka_exception-fqcn";
    /// The latest handler error's type name.
    pub const EXCEPTION_CAUSE_FQCN: &str = "kafka_exception-cause-fqcn";
    /// `Listener failed; <the latest handler error's message>`.
    pub const EXCEPTION_MESSAGE: &str = "kafka_exception-message";
    /// The latest failure as a Java stack trace without frames.
    pub const EXCEPTION_STACKTRACE: &str = "kafka_exception-stacktrace";
}

/// One set of header names: the dead-letter one or the retry chain's.
struct Names {
    topic: &'static str,
    partition: &'static str,
    offset: &'static str,
    timestamp: &'static str,
    timestamp_type: &'static str,
    group: &'static str,
    fqcn: &'static str,
    cause_fqcn: &'static str,
    message: &'static str,
    stacktrace: &'static str,
}

const DLT_NAMES: Names = Names {
    topic: ORIGINAL_TOPIC,
    partition: ORIGINAL_PARTITION,
    offset: ORIGINAL_OFFSET,
    timestamp: ORIGINAL_TIMESTAMP,
    timestamp_type: ORIGINAL_TIMESTAMP_TYPE,
    group: ORIGINAL_CONSUMER_GROUP,
    fqcn: EXCEPTION_FQCN,
    cause_fqcn: EXCEPTION_CAUSE_FQCN,
    message: EXCEPTION_MESSAGE,
    stacktrace: EXCEPTION_STACKTRACE,
};

const CHAIN_NAMES: Names = Names {
    topic: chain::ORIGINAL_TOPIC,
    partition: chain::ORIGINAL_PARTITION,
    offset: chain::ORIGINAL_OFFSET,
    timestamp: chain::ORIGINAL_TIMESTAMP,
    timestamp_type: chain::ORIGINAL_TIMESTAMP_TYPE,
    group: chain::ORIGINAL_CONSUMER_GROUP,
    fqcn: chain::EXCEPTION_FQCN,
    cause_fqcn: chain::EXCEPTION_CAUSE_FQCN,
    message: chain::EXCEPTION_MESSAGE,
    stacktrace: chain::EXCEPTION_STACKTRACE,
};

/// The exception class a Spring listener container wraps a listener's failure in.
pub const LISTENER_FAILED_FQCN: &str =
    "org.springframework.kafka.listener.ListenerExecutionFailedException";
/// Its message when the container wraps a failure.
pub const LISTENER_FAILED_MESSAGE: &str = "Listener failed";

/// The failed record's timestamp type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestampType {
    /// Set by the producer.
    CreateTime,
    /// Set by the broker.
    LogAppendTime,
    /// No timestamp.
    NotAvailable,
}

impl TimestampType {
    /// Kafka's name for it (`org.apache.kafka.common.record.TimestampType.name`, what
    /// Spring writes and `TimestampType.forName` reads back).
    pub fn as_str(self) -> &'static str {
        match self {
            TimestampType::CreateTime => "CreateTime",
            TimestampType::LogAppendTime => "LogAppendTime",
            TimestampType::NotAvailable => "NoTimestampType",
        }
    }
}

/// Where a failed record came from.
#[derive(Clone, Copy, Debug)]
pub struct Provenance<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Source timestamp (epoch ms), if any.
    pub timestamp: Option<i64>,
    /// Source timestamp type.
    pub timestamp_type: TimestampType,
    /// Consumer group.
    pub group: &'a str,
}

/// The headers of a main topic's dead-letter record: the original headers without any
/// earlier `kafka_dlt-*` header, then the exception and provenance headers in Spring's
/// order.
pub fn headers<'h>(
    original: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    from: &Provenance<'_>,
    error: &HandlerError,
) -> Vec<(String, Option<Vec<u8>>)> {
    build(original, from, error)
}

/// The headers of a record passed on along a retry chain (to a retry topic, or to the
/// chain's dead-letter topic), as Spring's `@RetryableTopic` recoverer writes them: with
/// the [`chain`] names; earlier exception headers replaced; each origin header added only
/// when the record has none yet, so the origin stays the main topic's record; every other
/// header (`kafka_dlt-*` included) kept as it is.
pub fn retry_hop_headers<'h>(
    original: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    from: &Provenance<'_>,
    error: &HandlerError,
) -> Vec<(String, Option<Vec<u8>>)> {
    let n = &CHAIN_NAMES;
    let exception = [n.fqcn, n.cause_fqcn, n.message, n.stacktrace];
    let mut out: Vec<(String, Option<Vec<u8>>)> = original
        .into_iter()
        .filter(|(k, _)| !exception.contains(k))
        .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
        .collect();
    put_exception(&mut out, n, error);
    for (name, value) in origin(n, from) {
        if !out.iter().any(|(k, _)| k == name) {
            out.push((name.to_string(), Some(value)));
        }
    }
    out
}

fn build<'h>(
    original: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    from: &Provenance<'_>,
    error: &HandlerError,
) -> Vec<(String, Option<Vec<u8>>)> {
    let n = &DLT_NAMES;
    let mut out: Vec<(String, Option<Vec<u8>>)> = original
        .into_iter()
        .filter(|(k, _)| !k.starts_with(PREFIX))
        .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
        .collect();
    put_exception(&mut out, n, error);
    out.extend(
        origin(n, from)
            .into_iter()
            .map(|(k, v)| (k.to_string(), Some(v))),
    );
    out
}

fn put_exception(out: &mut Vec<(String, Option<Vec<u8>>)>, n: &Names, error: &HandlerError) {
    let mut put = |k: &str, v: Vec<u8>| out.push((k.to_string(), Some(v)));
    put(n.fqcn, LISTENER_FAILED_FQCN.as_bytes().to_vec());
    put(n.cause_fqcn, error.type_name().as_bytes().to_vec());
    put(
        n.message,
        format!("{LISTENER_FAILED_MESSAGE}; {}", error.message_text()).into_bytes(),
    );
    put(n.stacktrace, stack_trace(error).into_bytes());
}

/// The origin headers for `from`, in Spring's order.
fn origin(n: &Names, from: &Provenance<'_>) -> [(&'static str, Vec<u8>); 6] {
    [
        (n.topic, from.topic.as_bytes().to_vec()),
        (n.partition, from.partition.to_be_bytes().to_vec()),
        (n.offset, from.offset.to_be_bytes().to_vec()),
        // Kafka's RecordBatch.NO_TIMESTAMP: Spring writes the record's timestamp always.
        (
            n.timestamp,
            from.timestamp.unwrap_or(-1).to_be_bytes().to_vec(),
        ),
        (
            n.timestamp_type,
            from.timestamp_type.as_str().as_bytes().to_vec(),
        ),
        (n.group, from.group.as_bytes().to_vec()),
    ]
}

/// `Throwable.printStackTrace` of the wrapped failure, without frames (a Rust error has
/// none): one line per throwable, each ended by a line feed.
fn stack_trace(error: &HandlerError) -> String {
    let mut s = format!(
        "{LISTENER_FAILED_FQCN}: {LISTENER_FAILED_MESSAGE}\nCaused by: {}: {}\n",
        error.type_name(),
        error.message_text()
    );
    // The trace's first line is the error itself; the rest is its cause chain.
    for (i, line) in error.trace().lines().skip(1).enumerate() {
        match (i, error.cause_type_name(), line.strip_prefix("Caused by: ")) {
            (0, Some(cause), Some(message)) => {
                s.push_str(&format!("Caused by: {cause}: {message}\n"));
            }
            _ => {
                s.push_str(line);
                s.push('\n');
            }
        }
    }
    s
}

/// Decodes a 4-byte big-endian int header value (for example [`ORIGINAL_PARTITION`]).
pub fn decode_i32(v: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(v.try_into().ok()?))
}

/// Decodes an 8-byte big-endian long header value (for example [`ORIGINAL_OFFSET`]).
pub fn decode_i64(v: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(v.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn from() -> Provenance<'static> {
        Provenance {
            topic: "orders",
            partition: 2,
            offset: 41,
            timestamp: Some(1_700_000_000_000),
            timestamp_type: TimestampType::CreateTime,
            group: "inventory",
        }
    }

    fn get<'a>(h: &'a [(String, Option<Vec<u8>>)], k: &str) -> Vec<&'a [u8]> {
        h.iter()
            .filter(|(n, _)| n == k)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }

    #[test]
    fn carries_spring_compatible_provenance() {
        let err = HandlerError::message(ErrorKind::Permanent, "bad qty")
            .with_type_name("java.lang.IllegalStateException");
        let h = headers(
            [("eventops-correlation-id", Some(&b"c1"[..]))],
            &from(),
            &err,
        );
        assert_eq!(get(&h, "eventops-correlation-id"), [b"c1"]);
        assert_eq!(get(&h, ORIGINAL_TOPIC), [b"orders"]);
        assert_eq!(decode_i32(get(&h, ORIGINAL_PARTITION)[0]), Some(2));
        assert_eq!(decode_i64(get(&h, ORIGINAL_OFFSET)[0]), Some(41));
        assert_eq!(
            decode_i64(get(&h, ORIGINAL_TIMESTAMP)[0]),
            Some(1_700_000_000_000)
        );
        assert_eq!(get(&h, ORIGINAL_TIMESTAMP_TYPE), [b"CreateTime"]);
        assert_eq!(get(&h, ORIGINAL_CONSUMER_GROUP), [b"inventory"]);
        assert_eq!(get(&h, EXCEPTION_FQCN), [LISTENER_FAILED_FQCN.as_bytes()]);
        assert_eq!(
            get(&h, EXCEPTION_CAUSE_FQCN),
            [b"java.lang.IllegalStateException"]
        );
        assert_eq!(get(&h, EXCEPTION_MESSAGE), [b"Listener failed; bad qty"]);
        assert_eq!(
            get(&h, EXCEPTION_STACKTRACE),
            [format!(
                "{LISTENER_FAILED_FQCN}: Listener failed\nCaused by: java.lang.IllegalStateException: bad qty\n"
            )
            .as_bytes()]
        );
    }

    #[test]
    fn timestamp_types_use_kafkas_names_and_the_timestamp_is_always_8_bytes() {
        let names: Vec<&str> = [
            TimestampType::CreateTime,
            TimestampType::LogAppendTime,
            TimestampType::NotAvailable,
        ]
        .map(TimestampType::as_str)
        .to_vec();
        assert_eq!(names, ["CreateTime", "LogAppendTime", "NoTimestampType"]);
        let none = Provenance {
            timestamp: None,
            timestamp_type: TimestampType::NotAvailable,
            ..from()
        };
        let h = headers([], &none, &HandlerError::message(ErrorKind::Permanent, "x"));
        assert_eq!(get(&h, ORIGINAL_TIMESTAMP), [&(-1i64).to_be_bytes()[..]]);
    }

    #[test]
    fn the_stack_trace_names_the_cause_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let err = HandlerError::transient(Outer(std::io::Error::other("disk gone")))
            .with_type_name("app.Outer")
            .with_cause_type_name("java.io.IOException");
        let h = headers([], &from(), &err);
        assert_eq!(
            std::str::from_utf8(get(&h, EXCEPTION_STACKTRACE)[0]).unwrap(),
            format!(
                "{LISTENER_FAILED_FQCN}: Listener failed\nCaused by: app.Outer: outer\nCaused by: java.io.IOException: disk gone\n"
            )
        );
    }

    #[test]
    fn republishing_never_accumulates_headers() {
        let err = HandlerError::message(ErrorKind::Permanent, "first");
        let once = headers([], &from(), &err);
        let again_from = Provenance {
            topic: "orders.DLT",
            offset: 7,
            ..from()
        };
        let err2 = HandlerError::message(ErrorKind::Permanent, "second");
        let twice = headers(
            once.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
            &again_from,
            &err2,
        );
        assert_eq!(once.len(), twice.len(), "{twice:?}");
        assert_eq!(get(&twice, ORIGINAL_TOPIC), [b"orders.DLT"]);
        assert_eq!(get(&twice, EXCEPTION_MESSAGE), [b"Listener failed; second"]);
    }

    #[test]
    fn a_retry_hop_keeps_the_origin_and_replaces_the_exception() {
        // The main topic's failure, sent to the first retry topic.
        let first = retry_hop_headers(
            [],
            &from(),
            &HandlerError::message(ErrorKind::Transient, "first"),
        );
        assert_eq!(get(&first, chain::ORIGINAL_TOPIC), [b"orders"]);
        assert!(get(&first, ORIGINAL_TOPIC).is_empty(), "{first:?}");
        let retry = Provenance {
            topic: "orders-retry-0",
            partition: 0,
            offset: 3,
            ..from()
        };
        let err2 = HandlerError::message(ErrorKind::Permanent, "second");
        let hop = retry_hop_headers(
            first.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
            &retry,
            &err2,
        );
        assert_eq!(first.len(), hop.len(), "{hop:?}");
        assert_eq!(get(&hop, chain::ORIGINAL_TOPIC), [b"orders"]);
        assert_eq!(decode_i64(get(&hop, chain::ORIGINAL_OFFSET)[0]), Some(41));
        assert_eq!(
            get(&hop, chain::EXCEPTION_MESSAGE),
            [b"Listener failed; second"]
        );
        // A dead-letter record's headers are not the chain's: kept as they are.
        let dead = headers([], &from(), &err2);
        let hop = retry_hop_headers(
            dead.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
            &retry,
            &err2,
        );
        assert_eq!(get(&hop, ORIGINAL_TOPIC), [b"orders"]);
        assert_eq!(get(&hop, chain::ORIGINAL_TOPIC), [b"orders-retry-0"]);
    }
}

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
//! replaced too when a main topic dead-letters ([`headers`]), and kept when a record is
//! passed on along a retry chain ([`retry_hop_headers`]), so its origin stays the main topic,
//! as Spring's retry topics do.

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
    build(original, from, error, false)
}

/// The headers of a record passed on along a retry chain (to the next retry topic, or from
/// a retry topic to the dead-letter topic): like [`headers`], but `kafka_dlt-original-*`
/// headers the record already carries are kept instead of `from`'s, so the origin stays the
/// main topic's record. Spring's retry topics do the same (`appendOriginalHeaders=false`).
pub fn retry_hop_headers<'h>(
    original: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    from: &Provenance<'_>,
    error: &HandlerError,
) -> Vec<(String, Option<Vec<u8>>)> {
    build(original, from, error, true)
}

fn build<'h>(
    original: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    from: &Provenance<'_>,
    error: &HandlerError,
    keep_origin: bool,
) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out: Vec<(String, Option<Vec<u8>>)> = original
        .into_iter()
        .filter(|(k, _)| !k.starts_with(PREFIX) || (keep_origin && k.starts_with(ORIGINAL_PREFIX)))
        .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
        .collect();
    let kept_origin = out.iter().any(|(k, _)| k.starts_with(ORIGINAL_PREFIX));
    let mut put = |k: &str, v: Vec<u8>| out.push((k.to_string(), Some(v)));
    put(EXCEPTION_FQCN, LISTENER_FAILED_FQCN.as_bytes().to_vec());
    put(EXCEPTION_CAUSE_FQCN, error.type_name().as_bytes().to_vec());
    put(
        EXCEPTION_MESSAGE,
        format!("{LISTENER_FAILED_MESSAGE}; {}", error.message_text()).into_bytes(),
    );
    put(EXCEPTION_STACKTRACE, stack_trace(error).into_bytes());
    if !kept_origin {
        put(ORIGINAL_TOPIC, from.topic.as_bytes().to_vec());
        put(ORIGINAL_PARTITION, from.partition.to_be_bytes().to_vec());
        put(ORIGINAL_OFFSET, from.offset.to_be_bytes().to_vec());
        // Kafka's RecordBatch.NO_TIMESTAMP: Spring writes the record's timestamp always.
        put(
            ORIGINAL_TIMESTAMP,
            from.timestamp.unwrap_or(-1).to_be_bytes().to_vec(),
        );
        put(
            ORIGINAL_TIMESTAMP_TYPE,
            from.timestamp_type.as_str().as_bytes().to_vec(),
        );
        put(ORIGINAL_CONSUMER_GROUP, from.group.as_bytes().to_vec());
    }
    out
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
        let first = headers(
            [],
            &from(),
            &HandlerError::message(ErrorKind::Transient, "first"),
        );
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
        assert_eq!(get(&hop, ORIGINAL_TOPIC), [b"orders"]);
        assert_eq!(decode_i64(get(&hop, ORIGINAL_OFFSET)[0]), Some(41));
        assert_eq!(get(&hop, EXCEPTION_MESSAGE), [b"Listener failed; second"]);
        let fresh = retry_hop_headers([], &retry, &err2);
        assert_eq!(get(&fresh, ORIGINAL_TOPIC), [b"orders-retry-0"]);
    }
}

//! Dead-letter records, compatible with Spring Kafka's `DeadLetterPublishingRecoverer`:
//! the same `kafka_dlt-*` provenance headers with the same encodings (partition as a
//! 4-byte big-endian int, offset and timestamp as 8-byte big-endian longs, the rest
//! UTF-8), the same partition number as the failed record, and earlier `kafka_dlt-*`
//! headers stripped so re-published records never accumulate them.

use crate::error::HandlerError;

/// Topic the failed record was read from.
pub const ORIGINAL_TOPIC: &str = "kafka_dlt-original-topic";
/// Its partition (4-byte big-endian int).
pub const ORIGINAL_PARTITION: &str = "kafka_dlt-original-partition";
/// Its offset (8-byte big-endian long).
pub const ORIGINAL_OFFSET: &str = "kafka_dlt-original-offset";
/// Its timestamp in epoch milliseconds (8-byte big-endian long).
pub const ORIGINAL_TIMESTAMP: &str = "kafka_dlt-original-timestamp";
/// `CREATE_TIME`, `LOG_APPEND_TIME` or `NO_TIMESTAMP_TYPE`.
pub const ORIGINAL_TIMESTAMP_TYPE: &str = "kafka_dlt-original-timestamp-type";
/// Consumer group that failed to process it.
pub const ORIGINAL_CONSUMER_GROUP: &str = "kafka_dlt-original-consumer-group";
/// The error's type name (Spring: the exception's fully qualified class name).
pub const EXCEPTION_FQCN: &str = "kafka_dlt-exception-fqcn";
/// The cause's type name, when known.
pub const EXCEPTION_CAUSE_FQCN: &str = "kafka_dlt-exception-cause-fqcn";
/// The error's message.
pub const EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";
/// The error with its cause chain.
pub const EXCEPTION_STACKTRACE: &str = "kafka_dlt-exception-stacktrace";
/// Prefix of every header above.
pub const PREFIX: &str = "kafka_dlt-";

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
    /// Kafka's (and Spring's) name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            TimestampType::CreateTime => "CREATE_TIME",
            TimestampType::LogAppendTime => "LOG_APPEND_TIME",
            TimestampType::NotAvailable => "NO_TIMESTAMP_TYPE",
        }
    }
}

/// Where a failed record came from.
#[derive(Clone, Copy, Debug)]
pub struct Provenance<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition; the dead-letter record goes to the same partition number.
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

/// The headers of the dead-letter record: the original headers without any earlier
/// `kafka_dlt-*` header, then the provenance and exception headers.
pub fn headers<'h>(
    original: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    from: &Provenance<'_>,
    error: &HandlerError,
) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out: Vec<(String, Option<Vec<u8>>)> = original
        .into_iter()
        .filter(|(k, _)| !k.starts_with(PREFIX))
        .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
        .collect();
    let mut put = |k: &str, v: Vec<u8>| out.push((k.to_string(), Some(v)));
    put(ORIGINAL_TOPIC, from.topic.as_bytes().to_vec());
    put(ORIGINAL_PARTITION, from.partition.to_be_bytes().to_vec());
    put(ORIGINAL_OFFSET, from.offset.to_be_bytes().to_vec());
    if let Some(ts) = from.timestamp {
        put(ORIGINAL_TIMESTAMP, ts.to_be_bytes().to_vec());
    }
    put(
        ORIGINAL_TIMESTAMP_TYPE,
        from.timestamp_type.as_str().as_bytes().to_vec(),
    );
    put(ORIGINAL_CONSUMER_GROUP, from.group.as_bytes().to_vec());
    put(EXCEPTION_FQCN, error.type_name().as_bytes().to_vec());
    if let Some(cause) = error.cause_type_name() {
        put(EXCEPTION_CAUSE_FQCN, cause.as_bytes().to_vec());
    }
    put(EXCEPTION_MESSAGE, error.message_text().as_bytes().to_vec());
    put(EXCEPTION_STACKTRACE, error.trace().as_bytes().to_vec());
    out
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
            .with_cause_type_name("std::num::ParseIntError");
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
        assert_eq!(get(&h, ORIGINAL_TIMESTAMP_TYPE), [b"CREATE_TIME"]);
        assert_eq!(get(&h, ORIGINAL_CONSUMER_GROUP), [b"inventory"]);
        assert_eq!(get(&h, EXCEPTION_MESSAGE), [b"bad qty"]);
        assert_eq!(get(&h, EXCEPTION_CAUSE_FQCN), [b"std::num::ParseIntError"]);
        assert!(
            std::str::from_utf8(get(&h, EXCEPTION_FQCN)[0])
                .unwrap()
                .ends_with("HandlerError")
        );
        assert_eq!(get(&h, EXCEPTION_STACKTRACE), [b"bad qty"]);
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
        assert_eq!(get(&twice, EXCEPTION_MESSAGE), [b"second"]);
    }
}

//! Retry topics shared with Spring Kafka's `@RetryableTopic`: its topic names and its
//! `retry_topic-*` headers, with Spring's encodings, so a Spring service and an EventOps
//! worker can hand records to each other along one retry chain.
//!
//! A record the runtime sends to a retry topic carries both the runtime's own headers
//! ([`RETRY_ATTEMPT_HEADER`], [`RETRY_DUE_HEADER`]) and Spring's ([`ATTEMPTS`],
//! [`BACKOFF_TIMESTAMP`], [`ORIGINAL_TIMESTAMP`]), plus the `kafka_original-*` and
//! `kafka_exception-*` headers Spring's retry topics carry (see
//! [`crate::dead_letter::retry_hop_headers`]). A record read from a
//! retry topic is due and numbered by whichever set it has, the runtime's first.
//!
//! The topic names are the operator's (the routes it hands over); [`spring_retry_topics`]
//! and [`spring_dead_letter_topic`] give Spring's, for a chain both sides consume.

/// Header with the attempt number of a record in a retry topic (decimal text).
pub const RETRY_ATTEMPT_HEADER: &str = "eventops-retry-attempt";
/// Header with the time (epoch ms, decimal text) before which a record in a retry topic is
/// not retried.
pub const RETRY_DUE_HEADER: &str = "eventops-retry-due-ms";

/// Spring's attempt number of the record's next delivery: a 4-byte big-endian int (older
/// Spring versions wrote one byte; both are read).
pub const ATTEMPTS: &str = "retry_topic-attempts";
/// Spring's due time (epoch ms) of the next attempt: `BigInteger.toByteArray()`, the
/// shortest big-endian two's complement.
pub const BACKOFF_TIMESTAMP: &str = "retry_topic-backoff-timestamp";
/// The main topic record's timestamp (epoch ms), kept along the chain, in the same encoding.
pub const ORIGINAL_TIMESTAMP: &str = "retry_topic-original-timestamp";

/// Spring's default suffix of retry topics (`RetryTopicConstants.DEFAULT_RETRY_SUFFIX`).
pub const SPRING_RETRY_SUFFIX: &str = "-retry";
/// Spring's default suffix of the dead-letter topic (`RetryTopicConstants.DEFAULT_DLT_SUFFIX`).
pub const SPRING_DLT_SUFFIX: &str = "-dlt";

/// How Spring suffixes retry topics (`TopicSuffixingStrategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpringSuffix {
    /// `<topic>-retry-<delay ms>`: Spring's default.
    DelayValue,
    /// `<topic>-retry-<index>`, from 0.
    IndexValue,
}

/// Spring's names of the retry topics of `topic` for its back-off delays (ms), as
/// `@RetryableTopic` names them with its default suffixes and its default
/// `SameIntervalTopicReuseStrategy.SINGLE_TOPIC`: a single topic is `<topic>-retry`; a run
/// of equal delays at the end (an exponential back-off at its maximum, or a fixed back-off)
/// is one topic that Spring reuses; equal delays are numbered by index. The runtime sends a
/// record through each named topic once.
pub fn spring_retry_topics(topic: &str, delays_ms: &[u64], suffix: SpringSuffix) -> Vec<String> {
    let Some(last) = delays_ms.last() else {
        return Vec::new();
    };
    let repeats_of_last = delays_ms.iter().filter(|d| *d == last).count();
    let amount = delays_ms.len() - (repeats_of_last - 1);
    let fixed = suffix == SpringSuffix::IndexValue
        || delays_ms.len() > 1 && delays_ms.iter().all(|d| d == last);
    (0..amount)
        .map(|i| match () {
            _ if amount == 1 => format!("{topic}{SPRING_RETRY_SUFFIX}"),
            _ if fixed => format!("{topic}{SPRING_RETRY_SUFFIX}-{i}"),
            _ => format!("{topic}{SPRING_RETRY_SUFFIX}-{}", delays_ms[i]),
        })
        .collect()
}

/// Spring's dead-letter topic of `topic`: `<topic>-dlt`.
pub fn spring_dead_letter_topic(topic: &str) -> String {
    format!("{topic}{SPRING_DLT_SUFFIX}")
}

/// `BigInteger.valueOf(v).toByteArray()`: big-endian two's complement, shortest form (at
/// least one byte).
pub fn encode_big_integer(v: i64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut start = 0;
    // Drop a leading byte while the next one still carries the sign.
    while start < 7
        && ((bytes[start] == 0x00 && bytes[start + 1] & 0x80 == 0)
            || (bytes[start] == 0xff && bytes[start + 1] & 0x80 != 0))
    {
        start += 1;
    }
    bytes[start..].to_vec()
}

/// `new BigInteger(bytes).longValue()` for up to 8 bytes; `None` for empty or longer values.
pub fn decode_big_integer(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() || bytes.len() > 8 {
        return None;
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0x00 };
    let mut full = [fill; 8];
    full[8 - bytes.len()..].copy_from_slice(bytes);
    Some(i64::from_be_bytes(full))
}

/// Spring's attempts header value: a 4-byte big-endian int.
pub fn encode_attempts(attempt: u32) -> Vec<u8> {
    (attempt as i32).to_be_bytes().to_vec()
}

/// Reads Spring's attempts header as Spring does: 4 bytes, or 1 byte from older versions.
pub fn decode_attempts(bytes: &[u8]) -> Option<u32> {
    match bytes.len() {
        1 => Some(u32::from(bytes[0])),
        4 => u32::try_from(i32::from_be_bytes(bytes.try_into().ok()?)).ok(),
        _ => None,
    }
}

/// The retry headers of a record sent on to a retry topic: both the runtime's and Spring's
/// for its attempt number `attempt` and due time `due_ms`. `original_timestamp_ms` is the
/// main topic record's timestamp: the value the record already carries in
/// [`ORIGINAL_TIMESTAMP`] wins, as in Spring.
pub fn retry_headers<'h>(
    current: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    attempt: u32,
    due_ms: i64,
    record_timestamp_ms: i64,
) -> Vec<(&'static str, Vec<u8>)> {
    let original = current
        .into_iter()
        .filter(|(k, _)| *k == ORIGINAL_TIMESTAMP)
        .filter_map(|(_, v)| v)
        .filter(|v| decode_big_integer(v).is_some())
        .last()
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| encode_big_integer(record_timestamp_ms));
    vec![
        (RETRY_ATTEMPT_HEADER, attempt.to_string().into_bytes()),
        (RETRY_DUE_HEADER, due_ms.to_string().into_bytes()),
        (ORIGINAL_TIMESTAMP, original),
        (ATTEMPTS, encode_attempts(attempt)),
        (BACKOFF_TIMESTAMP, encode_big_integer(due_ms)),
    ]
}

/// Whether `name` is one of the retry headers [`retry_headers`] writes (replaced, never
/// accumulated, on each hop).
pub fn is_retry_header(name: &str) -> bool {
    matches!(
        name,
        RETRY_ATTEMPT_HEADER | RETRY_DUE_HEADER | ATTEMPTS | BACKOFF_TIMESTAMP | ORIGINAL_TIMESTAMP
    )
}

/// The attempt number of a record read from a retry topic, from the last value of
/// `header(name)`: the runtime's header, else Spring's.
pub fn attempt<'a>(header: impl Fn(&str) -> Option<&'a [u8]>) -> Option<u32> {
    header(RETRY_ATTEMPT_HEADER)
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .or_else(|| header(ATTEMPTS).and_then(decode_attempts))
}

/// The due time (epoch ms) of a record read from a retry topic: the runtime's header, else
/// Spring's.
pub fn due_ms<'a>(header: impl Fn(&str) -> Option<&'a [u8]>) -> Option<i64> {
    header(RETRY_DUE_HEADER)
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .or_else(|| header(BACKOFF_TIMESTAMP).and_then(decode_big_integer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_integers_are_encoded_as_java_does() {
        // BigInteger.valueOf(v).toByteArray() in Java.
        let cases: [(i64, &[u8]); 7] = [
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0x00, 0x80]),
            (-1, &[0xff]),
            (-129, &[0xff, 0x7f]),
            (1_700_000_000_000, &[0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00]),
            (i64::MAX, &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        ];
        for (v, java) in cases {
            assert_eq!(encode_big_integer(v), java, "{v}");
            assert_eq!(decode_big_integer(java), Some(v), "{v}");
        }
        assert_eq!(decode_big_integer(&[]), None);
    }

    #[test]
    fn attempts_are_4_byte_ints_and_old_single_bytes_are_read() {
        assert_eq!(encode_attempts(2), [0, 0, 0, 2]);
        assert_eq!(decode_attempts(&[0, 0, 0, 3]), Some(3));
        assert_eq!(decode_attempts(&[3]), Some(3));
        assert_eq!(decode_attempts(&[0, 3]), None);
    }

    #[test]
    fn topic_names_follow_spring() {
        let n = |d: &[u64], s| spring_retry_topics("orders", d, s);
        assert_eq!(n(&[1000], SpringSuffix::DelayValue), ["orders-retry"]);
        assert_eq!(
            n(&[1000, 2000], SpringSuffix::DelayValue),
            ["orders-retry-1000", "orders-retry-2000"]
        );
        assert_eq!(
            n(&[1000, 2000], SpringSuffix::IndexValue),
            ["orders-retry-0", "orders-retry-1"]
        );
        assert_eq!(
            n(&[500, 500, 500], SpringSuffix::DelayValue),
            ["orders-retry"]
        );
        assert_eq!(
            n(&[1000, 2000, 4000, 4000], SpringSuffix::DelayValue),
            [
                "orders-retry-1000",
                "orders-retry-2000",
                "orders-retry-4000"
            ]
        );
        assert!(n(&[], SpringSuffix::DelayValue).is_empty());
        assert_eq!(spring_dead_letter_topic("orders"), "orders-dlt");
    }

    #[test]
    fn both_header_sets_are_written_and_either_is_read() {
        let h = retry_headers([], 2, 1_700_000_000_500, 1_700_000_000_000);
        let get = |name: &str| {
            h.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_slice())
        };
        assert_eq!(attempt(get), Some(2));
        assert_eq!(due_ms(get), Some(1_700_000_000_500));
        assert_eq!(get(ATTEMPTS), Some(&[0, 0, 0, 2][..]));
        assert_eq!(
            decode_big_integer(get(ORIGINAL_TIMESTAMP).unwrap()),
            Some(1_700_000_000_000)
        );
        // A record from a Spring service has only Spring's headers.
        let spring = |name: &str| match name {
            ATTEMPTS => Some(&[0u8, 0, 0, 3][..]),
            BACKOFF_TIMESTAMP => Some(&[0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00][..]),
            _ => None,
        };
        assert_eq!(attempt(spring), Some(3));
        assert_eq!(due_ms(spring), Some(1_700_000_000_000));
        // The original timestamp is kept along the chain.
        let kept = [(ORIGINAL_TIMESTAMP, Some(&[0x05][..]))];
        let next = retry_headers(kept, 3, 0, 99);
        assert_eq!(
            next.iter()
                .find(|(k, _)| *k == ORIGINAL_TIMESTAMP)
                .unwrap()
                .1,
            [0x05]
        );
    }
}

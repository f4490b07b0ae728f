//! The envelope's fast path: one pass over the payload's text that checks the JSON
//! grammar as serde_json does, without serde's per-token dispatch, and skips the plain
//! contents of strings (the bulk of `data`) eight bytes at a time. The caller has checked
//! the payload is UTF-8 (JSON allows other bytes than ASCII only inside strings, where
//! the scanner passes them over).
//!
//! It answers only when it is sure: a payload it accepts is one serde_json accepts, and
//! decodes to the same envelope. Anything else (invalid JSON, a missing or duplicate
//! field, an escape in a key or in a field the envelope borrows, a number serde would
//! turn into something else, deep nesting) makes it give up, and the caller parses the
//! payload with serde_json, which gives today's result and error. The unit tests hold it
//! to serde_json's verdict.

use std::borrow::Cow;
use std::ops::Range;

use super::EventEnvelope;

/// Nesting it follows inside `data` or an unknown field before leaving the payload to
/// serde_json (whose own limit is 128 levels in all).
const MAX_DEPTH: u32 = 100;

/// Decodes an envelope, or `None` when serde_json must decide.
pub(super) fn envelope(text: &str) -> Option<EventEnvelope<'_>> {
    let bytes = text.as_bytes();
    let mut s = Scanner::new(bytes);
    let mut id = None;
    let mut event_type = None;
    let mut schema_version = None;
    let mut correlation_id: Option<Option<Range<usize>>> = None;
    let mut timestamp: Option<Option<Range<usize>>> = None;
    let mut data: Option<Option<Range<usize>>> = None;
    s.ws();
    s.eat(b'{')?;
    loop {
        s.ws();
        let key = &bytes[s.plain_string()?];
        s.ws();
        s.eat(b':')?;
        s.ws();
        match key {
            b"id" => set(&mut id, s.plain_string()?)?,
            b"type" => set(&mut event_type, s.plain_string()?)?,
            b"schemaVersion" => set(&mut schema_version, s.u32()?)?,
            b"correlationId" => set(&mut correlation_id, s.optional_string()?)?,
            b"timestamp" => set(&mut timestamp, s.optional_string()?)?,
            b"data" => {
                let value = if s.null() {
                    None
                } else {
                    let start = s.i;
                    s.value(MAX_DEPTH)?;
                    Some(start..s.i)
                };
                set(&mut data, value)?;
            }
            _ => s.value(MAX_DEPTH)?,
        }
        s.ws();
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    s.ws();
    if s.i != s.b.len() {
        return None;
    }
    // The ranges are of strings' contents (between ASCII quotes) and of whole values
    // (between ASCII bytes), so on character boundaries.
    let str_at = |r: Range<usize>| &text[r];
    Some(EventEnvelope {
        id: Cow::Borrowed(str_at(id?)),
        event_type: Cow::Borrowed(str_at(event_type?)),
        schema_version: schema_version?,
        correlation_id: correlation_id.flatten().map(|r| Cow::Borrowed(str_at(r))),
        timestamp: timestamp.flatten().map(|r| Cow::Borrowed(str_at(r))),
        data: data.flatten().map(str_at),
    })
}

/// Sets a field seen for the first time; `None` for a duplicate (serde_json rejects it).
fn set<T>(field: &mut Option<T>, value: T) -> Option<()> {
    field.is_none().then(|| *field = Some(value))
}

/// Whether `value` is one JSON value, as [`envelope`] checks `data`: `Some(true)` valid,
/// `Some(false)` invalid, `None` too deep to tell.
#[cfg(test)]
pub(super) fn valid_value(value: &str) -> Option<bool> {
    let mut s = Scanner::new(value.as_bytes());
    s.ws();
    let ok = s.value(MAX_DEPTH).is_some() && {
        s.ws();
        s.i == s.b.len()
    };
    if !ok && s.depth_exceeded(value) {
        return None;
    }
    Some(ok)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b, i: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// Consumes `null` if it comes next.
    fn null(&mut self) -> bool {
        let found = self.b[self.i..].starts_with(b"null");
        if found {
            self.i += 4;
        }
        found
    }

    /// One JSON value, with at most `depth` levels of nesting.
    fn value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' => {
                let depth = depth.checked_sub(1)?;
                self.i += 1;
                self.ws();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    if self.peek()? != b'"' {
                        return None;
                    }
                    self.string()?;
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    self.value(depth)?;
                    self.ws();
                    match self.next()? {
                        b',' => continue,
                        b'}' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b'[' => {
                let depth = depth.checked_sub(1)?;
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    self.value(depth)?;
                    self.ws();
                    match self.next()? {
                        b',' => continue,
                        b']' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.i..]
            .starts_with(word)
            .then(|| self.i += word.len())
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, as serde_json reads it.
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next()? {
            // serde_json rejects a leading zero followed by a digit.
            b'0' if matches!(self.peek(), Some(b'0'..=b'9')) => return None,
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.one_or_more_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.one_or_more_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn one_or_more_digits(&mut self) -> Option<()> {
        let start = self.i;
        self.digits();
        (self.i > start).then_some(())
    }

    /// A `u32` written as plain digits (what serde_json turns into one); anything else,
    /// such as `1.0`, `-0` or a number too large, is left to serde_json.
    fn u32(&mut self) -> Option<u32> {
        let start = self.i;
        self.digits();
        let digits = &self.b[start..self.i];
        if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.peek() {
            return None;
        }
        digits.iter().try_fold(0u32, |n, d| {
            n.checked_mul(10)?.checked_add(u32::from(d - b'0'))
        })
    }

    /// A string, or `null`.
    fn optional_string(&mut self) -> Option<Option<Range<usize>>> {
        if self.null() {
            return Some(None);
        }
        self.plain_string().map(Some)
    }

    /// A string without escapes, which the envelope borrows as it is: where its
    /// contents are.
    fn plain_string(&mut self) -> Option<Range<usize>> {
        let start = self.i + 1;
        if self.string()? {
            return None;
        }
        Some(start..self.i - 1)
    }

    /// A string starting at the opening quote; `Some(true)` when it has escapes.
    fn string(&mut self) -> Option<bool> {
        if self.peek()? != b'"' {
            return None;
        }
        self.i += 1;
        let mut escaped = false;
        loop {
            self.i += special(&self.b[self.i..]);
            match self.next()? {
                b'"' => return Some(escaped),
                b'\\' => {
                    escaped = true;
                    match self.next()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        // serde_json checks only that four hex digits follow, when it skips.
                        b'u' => {
                            let hex = self.b.get(self.i..self.i + 4)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.i += 4;
                        }
                        _ => return None,
                    }
                }
                // A control character: not allowed in a JSON string.
                _ => return None,
            }
        }
    }

    /// Whether `value` nests deeper than the scanner follows (test helper).
    #[cfg(test)]
    fn depth_exceeded(&self, value: &str) -> bool {
        let (mut depth, mut max) = (0i64, 0i64);
        for c in value.bytes() {
            match c {
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth -= 1,
                _ => {}
            }
            max = max.max(depth);
        }
        max > i64::from(MAX_DEPTH)
    }
}

/// The index of the first `"`, `\` or control character in `b` (`b.len()` if none): the
/// end of a run of a string's plain contents.
///
/// Eight bytes at a time, as the bytes of a `u64` (a 1 KiB event's `data` is mostly one
/// long string). In `(x - 0x01…) & !x & 0x80…` the top bit of a byte of `x` is set if the
/// byte is zero, in `(x - 0x20…) & !x & 0x80…` if it is below 0x20; XOR with `"…` or `\…`
/// makes those bytes zero and leaves the top bits alone. `!x` clears the bit of every
/// byte from 0x80 up (the bytes of characters beyond ASCII). A borrow can set the bit of
/// a byte above a match, never below one, so the lowest bit set is the first such byte.
#[inline]
fn special(b: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    let mut at = 0;
    for chunk in b.chunks_exact(8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let found = ((x ^ (ONES * u64::from(b'"'))).wrapping_sub(ONES)
            | (x ^ (ONES * u64::from(b'\\'))).wrapping_sub(ONES)
            | x.wrapping_sub(ONES * 0x20))
            & !x
            & (ONES * 0x80);
        if found != 0 {
            return at + (found.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    b[at..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map_or(b.len(), |p| at + p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::EnvelopeError;
    use serde::de::IgnoredAny;

    /// serde_json's verdict on one JSON value: the oracle.
    fn serde_accepts(value: &str) -> bool {
        serde_json::from_str::<IgnoredAny>(value).is_ok()
    }

    fn envelope_with(data: &str) -> String {
        format!(r#"{{"id":"e-1","type":"OrderPlaced","schemaVersion":1,"data":{data}}}"#)
    }

    /// The fast path agrees with serde_json on `text`: whatever it decodes, serde_json
    /// decodes the same; whatever serde_json rejects, it leaves to serde_json.
    fn check_envelope(text: &str) -> bool {
        let fast = envelope(text);
        let slow = serde_json::from_str::<EventEnvelope<'_>>(text);
        match (fast, slow) {
            (Some(f), Ok(s)) => {
                assert_eq!(f.id, s.id, "{text}");
                assert_eq!(f.event_type, s.event_type, "{text}");
                assert_eq!(f.schema_version, s.schema_version, "{text}");
                assert_eq!(f.correlation_id, s.correlation_id, "{text}");
                assert_eq!(f.timestamp, s.timestamp, "{text}");
                assert_eq!(f.data, s.data, "{text}");
                true
            }
            (Some(_), Err(e)) => panic!("accepted what serde_json rejects ({e}): {text}"),
            (None, _) => false,
        }
    }

    const VALID: &[&str] = &[
        "{}",
        "[]",
        " { } ",
        r#"{"a":1}"#,
        r#"{ "a" : [ 1 , 2 ] , "b" : { } }"#,
        r#"{"a":[1,2,{"b":"}"}],"c":"]"}"#,
        r#""{[}]""#,
        r#"{"}":"{","[":"]"}"#,
        r#""a\"b""#,
        r#""\\""#,
        r#""\\\"""#,
        r#""\/\b\f\n\r\t""#,
        r#""\u00e9\u00E9""#,
        r#""\uD83D\uDE00""#,
        // serde_json checks only the four hex digits of an escape it skips.
        r#""\uD800""#,
        r#""\uDC00x""#,
        "\"é ü 日本 😀\"",
        "\"\u{7f}\"",
        "0",
        "-0",
        "1.5",
        "-0.0e-0",
        "1e5",
        "1E+5",
        "12345678901234567890123456789",
        "true",
        "false",
        "null",
        "[null,true,false]",
        "[[[[[]]]]]",
        r#"{"items":[{"sku":"sku-1","quantity":1,"priceCents":199}],"note":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
    ];

    const INVALID: &[&str] = &[
        "",
        " ",
        "{",
        "}",
        "[",
        "[1,]",
        "[,1]",
        "[1 2]",
        r#"{"a":1,}"#,
        r#"{"a"}"#,
        r#"{"a":}"#,
        r#"{1:2}"#,
        r#"{a:1}"#,
        r#"{"a" 1}"#,
        r#"{"a":1 "b":2}"#,
        r#"{"a":1]"#,
        r#"[1}"#,
        r#"""#,
        r#""abc"#,
        r#""\""#,
        r#""\x""#,
        r#""\u12""#,
        r#""\u12g4""#,
        r#""\U0041""#,
        "\"a\nb\"",
        "\"a\tb\"",
        "\"\u{1}\"",
        "01",
        "-",
        "--1",
        "+1",
        ".5",
        "1.",
        "1.e5",
        "1e",
        "1e+",
        "0x10",
        "tru",
        "nul",
        "nulll",
        "True",
        "NaN",
        "[1]]",
        "{}}",
        "1 2",
        "'a'",
    ];

    #[test]
    fn agrees_with_serde_json_on_chosen_values() {
        for v in VALID {
            assert!(serde_accepts(v), "the oracle rejects {v:?}");
            assert_eq!(valid_value(v), Some(true), "{v:?}");
            assert!(
                check_envelope(&envelope_with(v)),
                "not on the fast path: {v:?}"
            );
        }
        for v in INVALID {
            assert!(!serde_accepts(v), "the oracle accepts {v:?}");
            assert_eq!(valid_value(v), Some(false), "{v:?}");
            assert!(!check_envelope(&envelope_with(v)), "{v:?}");
        }
    }

    #[test]
    fn long_strings_are_scanned_in_blocks_and_byte_by_byte() {
        for len in [0usize, 1, 31, 32, 33, 63, 64, 65, 100, 800] {
            for at in [0, len / 2, len.saturating_sub(1)] {
                let x = "x".repeat(len);
                assert_eq!(valid_value(&format!("\"{x}\"")), Some(true));
                for special in ["\\\"", "\\u0041", "{", "é"] {
                    let mut s = x.clone();
                    s.insert_str(at.min(s.len()), special);
                    assert_eq!(valid_value(&format!("\"{s}\"")), Some(true), "{s}");
                }
                for bad in ["\"", "\n", "\u{1f}", "\\q"] {
                    let mut s = x.clone();
                    s.insert_str(at.min(s.len()), bad);
                    let v = format!("\"{s}\"");
                    assert_eq!(valid_value(&v), Some(serde_accepts(&v)), "{v:?}");
                    assert_eq!(valid_value(&v), Some(false), "{v:?}");
                }
            }
        }
    }

    #[test]
    fn deep_nesting_is_left_to_serde_json() {
        let deep = |n| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(valid_value(&deep(100)), Some(true));
        assert_eq!(valid_value(&deep(101)), None);
        assert!(!check_envelope(&envelope_with(&deep(120))));
        // serde_json decides instead, as before (it skips `data` without a depth limit).
        let text = envelope_with(&deep(200));
        let public = EventEnvelope::parse(Some(text.as_bytes())).unwrap();
        assert_eq!(public.data, Some(deep(200).as_str()));
    }

    #[test]
    fn envelopes_on_and_off_the_fast_path() {
        let on = [
            r#"{"id":"e","type":"T","schemaVersion":1}"#,
            r#"{"id":"e","type":"T","schemaVersion":1,"data":null}"#,
            r#"{"id":"e","type":"T","schemaVersion":4294967295,"data":{}}"#,
            r#" {"data":[1,{"a":"}"}],"schemaVersion":0,"type":"T","id":"e"} "#,
            r#"{"id":"e","type":"T","schemaVersion":1,"correlationId":null,"timestamp":"t"}"#,
            r#"{"id":"e","type":"T","schemaVersion":1,"correlationId":"c","unknown":{"x":[true]}}"#,
            r#"{"id":"e","type":"T","schemaVersion":1,"ID":5,"Data":"x","data":"\u0041"}"#,
            "{\"id\":\"é\",\"type\":\"T\",\"schemaVersion\":1,\"data\":\"日本\"}",
        ];
        for text in on {
            assert!(check_envelope(text), "not on the fast path: {text}");
        }
        let off = [
            // Rejected by serde_json.
            r#"{"type":"T","schemaVersion":1}"#,
            r#"{"id":"e","type":"T","schemaVersion":1,"id":"f"}"#,
            r#"{"id":"e","type":"T","schemaVersion":1,"data":{},"data":{}}"#,
            r#"{"id":"e","type":"T","schemaVersion":-1}"#,
            r#"{"id":"e","type":"T","schemaVersion":1.0}"#,
            r#"{"id":"e","type":"T","schemaVersion":01}"#,
            r#"{"id":"e","type":"T","schemaVersion":4294967296}"#,
            r#"{"id":5,"type":"T","schemaVersion":1}"#,
            r#"{"id":"e","type":"T","schemaVersion":1,"correlationId":7}"#,
            r#"{"id":"e","type":"T","schemaVersion":1,"data":{"a":}}"#,
            r#"{"id":"e","type":"T","schemaVersion":1,"unknown":[1,]}"#,
            r#"{"id":"e","type":"T","schemaVersion":1} x"#,
            r#"{"id":"e","type":"T","schemaVersion":1,}"#,
            r#"[]"#,
            r#"{}"#,
            // Accepted by serde_json, decided there.
            r#"{"id":"e\u0041","type":"T","schemaVersion":1}"#,
            r#"{"i\u0064":"e","type":"T","schemaVersion":1}"#,
            r#"{"id":"e","type":"T","schemaVersion":1e0}"#,
            r#"{"id":"e","type":"T","schemaVersion":-0}"#,
            r#"["e","T",1,null,null,{}]"#,
        ];
        for text in off {
            assert!(!check_envelope(text), "on the fast path: {text}");
            // Still what serde_json says, through the public entry point.
            let public = EventEnvelope::parse(Some(text.as_bytes())).map(|e| e.id.into_owned());
            let oracle = serde_json::from_str::<EventEnvelope<'_>>(text).map(|e| e.id.into_owned());
            match (public, oracle) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), EnvelopeError::from(b).to_string()),
                (a, b) => panic!("{text}: {a:?} against {b:?}"),
            }
        }
    }

    /// Random JSON, valid by construction.
    fn random_value(rng: &mut fastrand::Rng, depth: u32, out: &mut String) {
        let ws = |rng: &mut fastrand::Rng, out: &mut String| {
            if rng.u8(..8) == 0 {
                out.push_str([" ", "\n", "\t", "\r\n  "][rng.usize(..4)]);
            }
        };
        ws(rng, out);
        match if depth == 0 { rng.u8(..5) } else { rng.u8(..7) } {
            0 => out.push_str(["true", "false", "null"][rng.usize(..3)]),
            1 => out.push_str(
                [
                    "0",
                    "-0",
                    "12",
                    "-3.25",
                    "6e10",
                    "7E-2",
                    "1.5e+3",
                    "98765432109876543210",
                ][rng.usize(..8)],
            ),
            2..=4 => {
                out.push('"');
                for _ in 0..rng.usize(..40) {
                    out.push_str(
                        [
                            "x",
                            "{",
                            "}",
                            "[",
                            "]",
                            ",",
                            ":",
                            "é",
                            "\\\"",
                            "\\\\",
                            "\\n",
                            "\\u00e9",
                            "\\uD83D\\uDE00",
                            "\u{7f}",
                            "😀",
                            "xxxxxxxxxxxxxxxx",
                        ][rng.usize(..16)],
                    );
                }
                out.push('"');
            }
            5 => {
                out.push('[');
                for n in 0..rng.usize(..4) {
                    if n > 0 {
                        out.push(',');
                    }
                    random_value(rng, depth - 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for n in 0..rng.usize(..4) {
                    if n > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    out.push_str(["\"a\"", "\"b}\"", "\"\\\"\"", "\"data\""][rng.usize(..4)]);
                    ws(rng, out);
                    out.push(':');
                    random_value(rng, depth - 1, out);
                }
                out.push('}');
            }
        }
        ws(rng, out);
    }

    /// `text` with one character replaced, inserted or removed.
    fn mutate(rng: &mut fastrand::Rng, text: &str) -> String {
        const PIECES: &[&str] = &[
            "{", "}", "[", "]", "\"", "\\", ",", ":", " ", "\n", "\u{1}", "0", "1", "-", ".", "e",
            "+", "t", "n", "u", "x", "é",
        ];
        let chars: Vec<char> = text.chars().collect();
        let at = rng.usize(..=chars.len());
        let piece = PIECES[rng.usize(..PIECES.len())];
        let (head, tail) = chars.split_at(at);
        let head: String = head.iter().collect();
        match rng.u8(..3) {
            0 => format!("{head}{piece}{}", tail.iter().collect::<String>()),
            1 if !tail.is_empty() => {
                format!("{head}{piece}{}", tail[1..].iter().collect::<String>())
            }
            _ if !tail.is_empty() => format!("{head}{}", tail[1..].iter().collect::<String>()),
            _ => format!("{head}{piece}"),
        }
    }

    #[test]
    fn agrees_with_serde_json_on_random_and_mutated_json() {
        let mut rng = fastrand::Rng::with_seed(11);
        let (mut accepted, mut rejected) = (0, 0);
        for _ in 0..20_000 {
            let mut value = String::new();
            random_value(&mut rng, 4, &mut value);
            assert!(serde_accepts(&value), "{value:?}");
            assert_eq!(valid_value(&value), Some(true), "{value:?}");
            assert!(check_envelope(&envelope_with(&value)), "{value:?}");
            for _ in 0..3 {
                let mutated = mutate(&mut rng, &value);
                let oracle = serde_accepts(&mutated);
                assert_eq!(valid_value(&mutated), Some(oracle), "{mutated:?}");
                if oracle {
                    accepted += 1;
                } else {
                    rejected += 1;
                }
                // The whole envelope mutated, too: keys, fields, separators.
                let envelope = mutate(&mut rng, &envelope_with(&value));
                check_envelope(&envelope);
            }
        }
        assert!(accepted > 1000 && rejected > 1000, "{accepted} {rejected}");
    }

    /// Bytes that are not UTF-8, or only together with the right neighbours.
    const NOT_UTF8: &[&[u8]] = &[
        b"\xff",
        b"\x80",
        b"\xc3",
        b"\xc3\x28",
        b"\xc0\x80",
        b"\xe2\x82",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xf0\x9f\x98",
        b"\xe9",
    ];

    /// What `EventEnvelope::parse` did before the fast path: the oracle for bytes.
    fn parse_with_serde(bytes: &[u8]) -> Result<EventEnvelope<'_>, serde_json::Error> {
        match std::str::from_utf8(bytes) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(bytes),
        }
    }

    #[test]
    fn agrees_with_serde_json_on_bytes_utf8_or_not() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut fast, mut not_utf8) = (0, 0);
        for n in 0..20_000 {
            let mut value = String::new();
            random_value(&mut rng, 3, &mut value);
            let mut bytes = envelope_with(&value).into_bytes();
            for _ in 0..=rng.usize(..2) {
                let at = rng.usize(..=bytes.len());
                let piece: &[u8] = if n % 4 == 0 {
                    "é😀日".as_bytes()
                } else {
                    NOT_UTF8[rng.usize(..NOT_UTF8.len())]
                };
                bytes.splice(at..at, piece.iter().copied());
            }
            match simdutf8::basic::from_utf8(&bytes) {
                Ok(text) => fast += usize::from(check_envelope(text)),
                Err(_) => not_utf8 += 1,
            }
            match (EventEnvelope::parse(Some(&bytes)), parse_with_serde(&bytes)) {
                (Ok(a), Ok(b)) => {
                    assert_eq!((a.id, a.data), (b.id, b.data));
                }
                (Err(a), Err(b)) => assert_eq!(a.to_string(), EnvelopeError::from(b).to_string()),
                (a, b) => panic!("{:?}: {a:?} against {b:?}", String::from_utf8_lossy(&bytes)),
            }
        }
        assert!(fast > 1000 && not_utf8 > 1000, "{fast} {not_utf8}");
        // Valid multi-byte characters in every position of a word, inside strings.
        for len in 0..70 {
            let v = format!("\"{}é😀{}\"", "x".repeat(len), "y".repeat(len % 7));
            assert_eq!(valid_value(&v), Some(true), "{v}");
            let text = envelope_with(&v);
            assert!(check_envelope(&text), "{text}");
        }
    }

    #[test]
    fn special_finds_the_first_quote_backslash_or_control_character() {
        let naive = |b: &[u8]| {
            b.iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .unwrap_or(b.len())
        };
        // Every byte in every position of the first blocks, alone and before a special
        // one (a match can make the bytes above it look like one, never those below).
        for c in 0..=255u8 {
            for len in 0..40 {
                for at in 0..len {
                    let mut b = vec![b'x'; len];
                    b[at] = c;
                    assert_eq!(special(&b), naive(&b), "{b:?}");
                    for (next, d) in [(1, b'"'), (1, 0), (2, b'\\'), (7, 0x1f), (9, b'"')] {
                        if at + next < len {
                            b[at + next] = d;
                            assert_eq!(special(&b), naive(&b), "{b:?}");
                        }
                    }
                }
            }
        }
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..100_000 {
            let b: Vec<u8> = (0..rng.usize(..80))
                .map(|_| match rng.u8(..8) {
                    0 => rng.u8(..),
                    1 => [0x1f, 0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc]
                        [rng.usize(..10)],
                    _ => b'a',
                })
                .collect();
            assert_eq!(special(&b), naive(&b), "{b:?}");
        }
    }

    /// An envelope shaped like the benchmark's (`benchmarks/src/lib.rs`, `order_payload`):
    /// an `OrderPlaced` with three lines and a note padding it to 1 KiB, fields in the
    /// same order.
    fn order_payload(i: u64) -> Vec<u8> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Line {
            sku: String,
            quantity: u64,
            price_cents: u64,
        }
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Order<'a> {
            order_id: String,
            customer_id: String,
            items: Vec<Line>,
            note: &'a str,
        }
        let with_note = |note: &str| {
            let data = Order {
                order_id: format!("order-{i:09}"),
                customer_id: format!("customer-{:06}", i % 100_000),
                items: (0..3)
                    .map(|n| Line {
                        sku: format!("sku-{:05}", (i * 7 + n) % 20_000),
                        quantity: 1 + n,
                        price_cents: 199 + (i % 1000) * 10 + n,
                    })
                    .collect(),
                note,
            };
            crate::Envelope {
                id: format!("00000000-0000-4000-8000-{i:012}"),
                event_type: "OrderPlaced".into(),
                schema_version: 1,
                correlation_id: Some(format!("bench-{i}")),
                timestamp: Some("2026-11-23T00:00:00Z".into()),
                data,
            }
            .to_bytes()
        };
        let unpadded = with_note("").len();
        with_note(&"x".repeat(1024 - unpadded))
    }

    /// Times the fast path against main's serde_json path on 1 KiB envelopes shaped like
    /// the benchmark's: 20,000 distinct ones (20 MB, from L3 at best), and the first 200
    /// over and over (from L2, as a record just copied into its buffer). 30 rounds of
    /// 20,000 in which the variants take turns; prints the best and the median round,
    /// asserts nothing about time.
    #[test]
    #[ignore = "a micro-benchmark: cargo test --release -p eventops-consumer-runtime --lib -- --ignored --nocapture envelope_speed"]
    fn envelope_speed() {
        use std::hint::black_box;
        use std::time::Instant;
        let payloads: Vec<String> = (0..20_000)
            .map(|i| String::from_utf8(order_payload(i)).unwrap())
            .collect();
        assert!(payloads.iter().all(|p| p.len() == 1024));
        assert!(payloads.iter().all(|p| envelope(p).is_some()));
        type Variant<'v> = (&'v str, &'v dyn Fn(&str) -> usize);
        let variants: &[Variant<'_>] = &[
            ("main: std utf8 + serde_json", &|p| {
                let text = std::str::from_utf8(p.as_bytes()).unwrap();
                serde_json::from_str::<EventEnvelope<'_>>(text)
                    .unwrap()
                    .id
                    .len()
            }),
            ("EventEnvelope::parse", &|p| {
                EventEnvelope::parse(Some(p.as_bytes())).unwrap().id.len()
            }),
            ("scan alone", &|p| envelope(p).unwrap().id.len()),
            ("std utf8 alone", &|p| {
                std::str::from_utf8(p.as_bytes()).unwrap().len()
            }),
            ("simdutf8 alone", &|p| {
                simdutf8::basic::from_utf8(p.as_bytes()).unwrap().len()
            }),
        ];
        for (cache, count) in [("L3", payloads.len()), ("L2", 200)] {
            let mut rounds = vec![Vec::new(); variants.len()];
            for _ in 0..30 {
                for ((_, f), times) in variants.iter().zip(&mut rounds) {
                    let start = Instant::now();
                    let sum: usize = payloads[..count]
                        .iter()
                        .cycle()
                        .take(payloads.len())
                        .map(|p| f(black_box(p)))
                        .sum();
                    black_box(sum);
                    times.push(start.elapsed().as_secs_f64() * 1e9 / payloads.len() as f64);
                }
            }
            for times in &mut rounds {
                times.sort_by(f64::total_cmp);
            }
            let best = |v: usize| rounds[v][0];
            let median = |v: usize| rounds[v][rounds[v].len() / 2];
            println!(
                "ns per 1 KiB envelope from {cache}, best and median of 30 rounds, and over main's:"
            );
            for (v, (name, _)) in variants.iter().enumerate() {
                println!(
                    "  {name:34} {:7.1} {:7.1}   {:.3} {:.3}",
                    best(v),
                    median(v),
                    best(v) / best(0),
                    median(v) / median(0)
                );
            }
        }
    }
}

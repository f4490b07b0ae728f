//! How a handler says what went wrong: [`HandlerError`] is either
//! [`Transient`](ErrorKind::Transient) (worth retrying: a timeout, a lost connection) or
//! [`Permanent`](ErrorKind::Permanent) (retrying cannot help: invalid data, a broken
//! business rule). Permanent errors and exhausted retries go to the dead-letter topic.
//!
//! ```
//! use eventops_consumer_runtime::{ErrorKind, HandlerError, ResultExt};
//!
//! fn parse(s: &str) -> Result<u32, HandlerError> {
//!     s.parse::<u32>().permanent()
//! }
//! let err = parse("x").unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::Permanent);
//! assert_eq!(err.type_name(), "core::num::error::ParseIntError");
//! ```

use std::borrow::Cow;
use std::fmt;

/// Whether retrying a failed record can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Retry with back-off (a timeout, an unavailable dependency).
    Transient,
    /// Do not retry; dead-letter at once (bad data, an unknown schema version).
    Permanent,
}

impl ErrorKind {
    /// `transient` or `permanent`, as used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

/// A failed handling attempt: its kind, the error's type name (the dead-letter header
/// `kafka_dlt-exception-fqcn`), its message and its cause chain (the "stack trace").
#[derive(Clone, Debug)]
pub struct HandlerError {
    kind: ErrorKind,
    type_name: Cow<'static, str>,
    cause_type_name: Option<Cow<'static, str>>,
    message: String,
    trace: String,
}

impl HandlerError {
    /// A transient failure caused by `error`.
    pub fn transient<E: std::error::Error + 'static>(error: E) -> Self {
        Self::from_error(ErrorKind::Transient, error)
    }

    /// A permanent failure caused by `error`.
    pub fn permanent<E: std::error::Error + 'static>(error: E) -> Self {
        Self::from_error(ErrorKind::Permanent, error)
    }

    /// A failure described only by a message; its type name is
    /// `eventops_consumer_runtime::error::HandlerError`.
    pub fn message(kind: ErrorKind, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            kind,
            type_name: Cow::Borrowed(std::any::type_name::<HandlerError>()),
            cause_type_name: None,
            trace: message.clone(),
            message,
        }
    }

    /// A failure of `kind` caused by `error`; the type name is `E`'s and the trace lists
    /// `error` and its `source()` chain.
    pub fn from_error<E: std::error::Error + 'static>(kind: ErrorKind, error: E) -> Self {
        let mut trace = format!("{}: {error}", std::any::type_name::<E>());
        let mut source = error.source();
        while let Some(cause) = source {
            trace.push_str("\nCaused by: ");
            trace.push_str(&cause.to_string());
            source = cause.source();
        }
        Self {
            kind,
            type_name: Cow::Borrowed(std::any::type_name::<E>()),
            cause_type_name: None,
            message: error.to_string(),
            trace,
        }
    }

    /// Overrides the type name (for example a domain error code such as `orders.OutOfStock`).
    pub fn with_type_name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.type_name = name.into();
        self
    }

    /// Records the type name of the underlying cause (`kafka_dlt-exception-cause-fqcn`).
    pub fn with_cause_type_name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.cause_type_name = Some(name.into());
        self
    }

    /// Transient or permanent.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying can help.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// The error's Rust type name.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// The cause's type name, if recorded.
    pub fn cause_type_name(&self) -> Option<&str> {
        self.cause_type_name.as_deref()
    }

    /// The error's message.
    pub fn message_text(&self) -> &str {
        &self.message
    }

    /// The error and its causes, one per line.
    pub fn trace(&self) -> &str {
        &self.trace
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} error {}: {}",
            self.kind.as_str(),
            self.type_name,
            self.message
        )
    }
}

impl std::error::Error for HandlerError {}

/// A handler that panicked: the panic becomes a permanent [`HandlerError`] of this type
/// (`kafka_dlt-exception-fqcn` is `eventops_consumer_runtime::error::HandlerPanic`), so
/// the record is dead-lettered with the panic message and its partition goes on.
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {message}")]
pub struct HandlerPanic {
    /// The panic's message (`"unknown panic payload"` when it was not a string).
    pub message: String,
}

impl HandlerPanic {
    /// From the payload `std::panic::catch_unwind` returns.
    pub fn from_payload(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic payload".into());
        Self { message }
    }
}

/// Why an attempt did not succeed: the record's own failure (the handler's error: it
/// uses up retries and may dead-letter the record), or a failure of something the
/// runtime owns (the inbox database), which is never the record's fault: the partition
/// waits for it to come back and retries the same attempt.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The handler failed (or panicked).
    Record(HandlerError),
    /// A dependency of the runtime failed.
    Dependency(DependencyError),
}

impl From<HandlerError> for Failure {
    fn from(e: HandlerError) -> Self {
        Failure::Record(e)
    }
}

/// A failure of a dependency the runtime owns.
#[derive(Debug)]
pub(crate) struct DependencyError {
    /// Which one: a metric label (`inbox`).
    pub dependency: &'static str,
    /// What failed.
    pub message: String,
}

impl DependencyError {
    /// The inbox database failed while doing `what`.
    pub fn inbox(what: &str, error: impl fmt::Display) -> Self {
        Self {
            dependency: "inbox",
            message: format!("{what}: {error}"),
        }
    }
}

impl fmt::Display for DependencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.dependency, self.message)
    }
}

/// Classifies any `Result`'s error: `result.transient()?` or `result.permanent()?`.
pub trait ResultExt<T> {
    /// Maps the error to a transient [`HandlerError`].
    fn transient(self) -> Result<T, HandlerError>;
    /// Maps the error to a permanent [`HandlerError`].
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: std::error::Error + 'static> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn trace_lists_the_cause_chain() {
        let e = HandlerError::transient(Outer(std::io::Error::other("disk gone")));
        assert!(e.is_transient());
        assert!(e.type_name().ends_with("Outer"), "{}", e.type_name());
        assert_eq!(e.message_text(), "outer");
        assert!(e.trace().contains("Caused by: disk gone"), "{}", e.trace());
    }

    #[test]
    fn panics_keep_their_message() {
        let p = std::panic::catch_unwind(|| panic!("no customer {}", 7)).unwrap_err();
        let e = HandlerError::permanent(HandlerPanic::from_payload(&*p));
        assert_eq!(e.message_text(), "handler panicked: no customer 7");
        assert!(
            e.type_name().ends_with("error::HandlerPanic"),
            "{}",
            e.type_name()
        );
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(HandlerPanic::from_payload(&*p).message, "static");
    }

    #[test]
    fn message_errors_have_a_type_name() {
        let e = HandlerError::message(ErrorKind::Permanent, "no such customer");
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert!(e.type_name().ends_with("HandlerError"));
        assert_eq!(e.to_string().split(": ").last(), Some("no such customer"));
    }
}

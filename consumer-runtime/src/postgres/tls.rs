//! TLS to PostgreSQL with rustls, configured the way libpq is: by `sslmode` and
//! `sslrootcert` in the connection string (URL query parameters or `key=value` pairs).
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | – |
//! | `prefer` (default, as libpq) | if the server offers TLS | no |
//! | `require` | yes | no; with `sslrootcert`, its chain (as libpq does) |
//! | `verify-ca` | yes | chain to `sslrootcert` |
//! | `verify-full` | yes | chain to `sslrootcert`, and the host name |
//!
//! `sslrootcert` is a PEM file of trusted CA certificates, or `system` for the
//! operating system's store. The host name checked by `verify-full` is `host`; `hostaddr`,
//! when given, is only where the connection goes. `require` still protects SCRAM
//! passwords against a man in the middle through channel binding
//! (`SCRAM-SHA-256-PLUS`), but only `verify-full` authenticates the server.
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`: the two
//! parameters are taken out of the string here, and the certificate check is rustls'.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::idempotency::InboxError;

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, certificate not checked.
    Prefer,
    /// TLS, certificate not checked (its chain is, when `sslrootcert` is given).
    Require,
    /// TLS, certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, certificate chain and host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, InboxError> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            // libpq's `allow` means "plain text unless the server insists"; rustls has no
            // fallback, so it is refused rather than silently upgraded.
            other => {
                return Err(InboxError(format!(
                    "the database URL's sslmode is {other:?}; expected disable, prefer, \
                     require, verify-ca or verify-full"
                )));
            }
        })
    }
}

/// Where trusted CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file.
    File(PathBuf),
    /// The operating system's certificate store (`sslrootcert=system`).
    System,
}

/// The TLS part of a connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root_certs: Option<RootCerts>,
}

/// Parses a connection string (a `postgres://` URL or `key=value` pairs) into
/// tokio-postgres' configuration and the TLS settings it does not know.
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, TlsSettings), InboxError> {
    let (rest, sslmode, sslrootcert) =
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            split_url(url)?
        } else {
            split_key_values(url)?
        };
    let mode = match &sslmode {
        Some(m) => SslMode::parse(m)?,
        None => SslMode::Prefer,
    };
    let root_certs = sslrootcert.map(|v| match v.as_str() {
        "system" => RootCerts::System,
        path => RootCerts::File(PathBuf::from(path)),
    });
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_certs.is_none() {
        return Err(InboxError(format!(
            "the database URL has sslmode={} but no sslrootcert; add sslrootcert=<PEM file \
             of the CA that signed the server's certificate> (or sslrootcert=system)",
            sslmode.unwrap_or_default()
        )));
    }
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| InboxError(format!("the database URL is invalid: {e}")))?;
    config.ssl_mode(match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
    });
    Ok((config, TlsSettings { mode, root_certs }))
}

type Split = (String, Option<String>, Option<String>);

/// Takes `sslmode` and `sslrootcert` out of a URL's query.
fn split_url(url: &str) -> Result<Split, InboxError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None, None));
    };
    let (mut sslmode, mut sslrootcert) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(k)?.as_str() {
            "sslmode" => sslmode = Some(percent_decode(v)?),
            "sslrootcert" => sslrootcert = Some(percent_decode(v)?),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, sslmode, sslrootcert))
}

fn percent_decode(s: &str) -> Result<String, InboxError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    InboxError(format!(
                        "the database URL has a bad percent escape in {s:?}"
                    ))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| InboxError(format!("the database URL's {s:?} is not UTF-8")))
}

/// Takes `sslmode` and `sslrootcert` out of libpq `key=value` pairs (values optionally in
/// single quotes, `\` escaping), and writes the others back quoted.
fn split_key_values(s: &str) -> Result<Split, InboxError> {
    let (mut sslmode, mut sslrootcert) = (None, None);
    let mut kept = String::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(InboxError(format!(
                "the database connection string is invalid: expected key=value at {key:?}"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(InboxError(format!(
                            "the database connection string has an unclosed quote in {key}"
                        )));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        match key.as_str() {
            "sslmode" => sslmode = Some(value),
            "sslrootcert" => sslrootcert = Some(value),
            _ => {
                let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
                kept.push_str(&format!("{key}='{escaped}' "));
            }
        }
    }
    Ok((kept.trim_end().to_string(), sslmode, sslrootcert))
}

/// The rustls connector for `settings` (for `disable` too: tokio-postgres then never
/// starts a handshake).
pub fn connector(settings: &TlsSettings) -> Result<MakeRustlsConnect, InboxError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &settings.root_certs {
        None => None,
        Some(source) => Some(Arc::new(root_store(source)?)),
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (settings.mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| InboxError(format!("sslrootcert: {e}")))?
        }
        (SslMode::VerifyCa | SslMode::Require, Some(roots)) => Arc::new(ChainOnly(
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| InboxError(format!("sslrootcert: {e}")))?,
        )),
        _ => Arc::new(Unverified(provider.clone())),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| InboxError(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn root_store(source: &RootCerts) -> Result<rustls::RootCertStore, InboxError> {
    let mut store = rustls::RootCertStore::empty();
    match source {
        RootCerts::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    InboxError(format!(
                        "sslrootcert {}: cannot read PEM certificates: {e}",
                        path.display()
                    ))
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(InboxError(format!(
                    "sslrootcert {} holds no usable CA certificate",
                    path.display()
                )));
            }
        }
        RootCerts::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(InboxError(format!(
                    "sslrootcert=system: no CA certificate found in the system store ({:?})",
                    found.errors
                )));
            }
        }
    }
    Ok(store)
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without `sslrootcert`: any certificate (libpq's meaning);
/// the handshake's signatures are still checked, so the key matches the certificate.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_libpq_has_and_tokio_postgres_lacks_are_taken_out() {
        let (config, tls) = parse(
            "postgres://u:p@db.example:5433/inbox?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=w",
        )
        .unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_certs, Some(RootCerts::File("/etc/ca.pem".into())));
        assert_eq!(config.get_ssl_mode(), PgSslMode::Require);
        assert_eq!(config.get_application_name(), Some("w"));
        assert_eq!(config.get_dbname(), Some("inbox"));

        let (config, tls) = parse("postgres://u@h/d").unwrap();
        assert_eq!(tls.mode, SslMode::Prefer, "libpq's default");
        assert_eq!(config.get_ssl_mode(), PgSslMode::Prefer);
        let (config, _) = parse("postgres://u@h/d?sslmode=disable").unwrap();
        assert_eq!(config.get_ssl_mode(), PgSslMode::Disable);
    }

    #[test]
    fn key_value_strings_keep_their_other_parameters() {
        let (config, tls) = parse(
            "host=db.example hostaddr=127.0.0.1 user=me password='a b\\'c' \
             sslmode = verify-ca sslrootcert='/tmp/my ca.pem' dbname=x",
        )
        .unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(
            tls.root_certs,
            Some(RootCerts::File("/tmp/my ca.pem".into()))
        );
        assert_eq!(config.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(config.get_dbname(), Some("x"));
        assert_eq!(config.get_hostaddrs().len(), 1);
    }

    #[test]
    fn bad_tls_settings_name_the_parameter() {
        let e = parse("postgres://h/d?sslmode=verify-full").unwrap_err();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        let e = parse("postgres://h/d?sslmode=allow").unwrap_err();
        assert!(e.to_string().contains("sslmode"), "{e}");
        let e = connector(&TlsSettings {
            mode: SslMode::VerifyFull,
            root_certs: Some(RootCerts::File("/nonexistent/ca.pem".into())),
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}

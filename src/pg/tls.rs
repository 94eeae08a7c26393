//! TLS for [`super::PgConnection`], with libpq's `sslmode` semantics.
//!
//! Over TCP, unless `sslmode=disable`, the client sends SSLRequest and reads
//! one byte: `S` starts a TLS handshake (rustls, `ring` provider), `N` leaves
//! the connection in plain text for `prefer` and fails for the stricter modes.
//! Unix sockets never use TLS (libpq ignores sslmode there too).
//!
//! Certificate checks, as libpq does them:
//! - `prefer`/`require`: none, unless a root certificate file exists
//!   (`sslrootcert`, else `~/.postgresql/root.crt`), in which case the chain is
//!   checked as for `verify-ca`. Handshake signatures are always verified.
//! - `verify-ca`: the chain must lead to a CA in `sslrootcert`; any host name.
//! - `verify-full`: as `verify-ca`, and the certificate must name the host
//!   (DNS name or IP address).
//!
//! Exactly one byte is read before the handshake, so nothing the server sends
//! in plain text can be taken for TLS-protected data (CVE-2021-23222).
//!
//! Channel binding: [`TlsInfo::end_point`] is the `tls-server-end-point`
//! value of RFC 5929: the server certificate hashed with the hash of its
//! signature algorithm (SHA-256 for MD5/SHA-1), as PostgreSQL's
//! `be_tls_get_certificate_hash` computes it. Ed25519/Ed448 certificates have
//! no such hash; PostgreSQL cannot bind to them either, so walvault then logs
//! in with SCRAM-SHA-256 without binding.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres_protocol::message::frontend;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::conn::PgError;
use super::conninfo::{ConnParams, SslMode};

/// What the handshake established, for authentication.
#[derive(Debug, Clone)]
pub(super) struct TlsInfo {
    /// `tls-server-end-point` channel binding data; `None` when the
    /// certificate's signature algorithm has no defined hash.
    pub end_point: Option<Vec<u8>>,
}

/// The stream after SSLRequest.
pub(super) enum Negotiated {
    /// The server declined and `sslmode=prefer` allows plain text.
    Plain(TcpStream),
    /// TLS is up.
    Tls(Box<TlsStream<TcpStream>>, TlsInfo),
}

/// libpq's spelling of a mode, for messages.
pub(super) fn mode_name(m: SslMode) -> &'static str {
    match m {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// Send SSLRequest on `tcp` and, if the server agrees, do the TLS handshake
/// with the checks `p.sslmode` asks for. `host` is the name connected to.
pub(super) async fn negotiate(
    mut tcp: TcpStream,
    p: &ConnParams,
    host: &str,
    target: &str,
) -> Result<Negotiated, PgError> {
    let mode = mode_name(p.sslmode);
    let fail = |reason: String| PgError::Tls {
        target: target.to_owned(),
        sslmode: mode,
        reason,
    };
    // build the configuration first: a missing sslrootcert is the user's
    // mistake, whatever the server would have answered
    let config = build_config(p).map_err(|e| fail(e.to_string()))?;
    let server_name = ServerName::try_from(host.to_owned())
        .map_err(|e| fail(format!("{host:?} is not a valid host name for TLS: {e}")))?;
    let io = |source| PgError::Io {
        target: target.to_owned(),
        source,
    };
    let mut buf = bytes::BytesMut::with_capacity(8);
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(io)?;
    let answer = tcp.read_u8().await.map_err(io)?;
    match answer {
        b'S' => {}
        b'N' if p.sslmode == SslMode::Prefer => return Ok(Negotiated::Plain(tcp)),
        b'N' => return Err(fail("the server does not accept TLS connections".into())),
        // Not read further: the server is not authenticated yet, so its text
        // cannot be trusted (libpq does the same).
        b'E' => {
            return Err(fail(
                "the server answered the TLS request with an error (out of connections, or failing to start a backend); see its log".into(),
            ))
        }
        other => {
            return Err(fail(format!(
                "the server answered the TLS request with byte {other:#04x}, not S or N: is this a PostgreSQL server?"
            )))
        }
    }
    let stream = TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| fail(handshake_error(&e, p, host)))?;
    let end_point = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| tls_server_end_point(cert.as_ref()));
    Ok(Negotiated::Tls(Box::new(stream), TlsInfo { end_point }))
}

/// A one-line reason for a failed handshake, saying what to do.
fn handshake_error(e: &std::io::Error, p: &ConnParams, host: &str) -> String {
    let root = || {
        root_cert_path(p)
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "sslrootcert".into())
    };
    let Some(rustls_err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return format!("TLS handshake failed: {e}");
    };
    match rustls_err {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate does not name host {host:?} (host name mismatch); connect with a name the certificate lists, or use sslmode=verify-ca"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the server's certificate is not trusted: it is not signed by a CA in {}",
            root()
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the server's certificate has expired".into(),
        rustls::Error::InvalidCertificate(c) => {
            format!("the server's certificate is not trusted: {c:?}")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// The root certificate file libpq would use: `sslrootcert`, else
/// `~/.postgresql/root.crt`.
fn root_cert_path(p: &ConnParams) -> Option<PathBuf> {
    p.sslrootcert
        .clone()
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt")))
}

/// Why no TLS configuration could be built; the `reason` of [`PgError::Tls`].
#[derive(Debug, thiserror::Error)]
enum TlsSetupError {
    /// rustls refused the protocol versions or the verifier.
    #[error("cannot set up TLS: {0}")]
    Rustls(rustls::Error),
    /// `sslrootcert=system`.
    #[error("sslrootcert=system is not supported by walvault; give the path of a PEM file holding the CA certificate")]
    SystemRoots,
    /// verify-ca/verify-full with a root file that is not there.
    #[error("the root certificate file {} does not exist; set sslrootcert to the CA certificate that signed the server's certificate, or use sslmode=require", .0.display())]
    MissingRootFile(std::path::PathBuf),
    /// verify-ca/verify-full without any root file.
    #[error("no root certificate file: set sslrootcert to the CA certificate that signed the server's certificate, or use sslmode=require")]
    NoRootFile,
    /// The root file cannot be read as PEM.
    #[error("cannot read sslrootcert {}: {reason}", file.display())]
    UnreadableRoots {
        /// The file.
        file: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The root file holds no certificate rustls can use.
    #[error("sslrootcert {} holds no usable PEM certificate", .0.display())]
    NoUsableRoot(std::path::PathBuf),
    /// The verifier refused the roots.
    #[error("cannot use {}: {reason}", file.display())]
    BadRoots {
        /// The file.
        file: std::path::PathBuf,
        /// Why.
        reason: String,
    },
}

/// The rustls configuration for `p.sslmode` (a fresh `ring` provider, no
/// process-wide default).
fn build_config(p: &ConnParams) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Rustls)?;
    let root = root_cert_path(p);
    if p.sslrootcert.as_deref() == Some(Path::new("system")) {
        return Err(TlsSetupError::SystemRoots);
    }
    let verify_name = p.sslmode == SslMode::VerifyFull;
    let verify_chain = match p.sslmode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            match &root {
                Some(f) if f.exists() => {}
                Some(f) => return Err(TlsSetupError::MissingRootFile(f.clone())),
                None => return Err(TlsSetupError::NoRootFile),
            }
            true
        }
        // libpq checks the chain whenever a root certificate file exists
        _ => root.as_deref().is_some_and(Path::exists),
    };
    let mut config = if verify_chain {
        let file = root.unwrap_or_default();
        let roots = load_roots(&file)?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsSetupError::BadRoots {
                file: file.clone(),
                reason: e.to_string(),
            })?;
        let verifier: Arc<dyn ServerCertVerifier> = if verify_name {
            webpki
        } else {
            Arc::new(ChainOnly { inner: webpki })
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { algs }))
            .with_no_client_auth()
    };
    // libpq 17 sends this ALPN; older servers ignore it
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

fn load_roots(file: &Path) -> Result<RootCertStore, TlsSetupError> {
    let unreadable = |e: rustls::pki_types::pem::Error| TlsSetupError::UnreadableRoots {
        file: file.to_owned(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(unreadable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsSetupError::NoUsableRoot(file.to_owned()));
    }
    Ok(roots)
}

/// `sslmode=require` without a root certificate: any certificate, but the
/// handshake signatures must still verify (the server holds the key of the
/// certificate it showed, which channel binding relies on).
#[derive(Debug)]
struct AnyCertificate {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the host name is not. rustls checks the
/// chain before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
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
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Hash for `tls-server-end-point` (RFC 5929 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// RFC 5929 channel binding data of a DER certificate; `None` when its
/// signature algorithm names no hash (Ed25519, Ed448) or is unknown.
pub(super) fn tls_server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    Some(match signature_hash(der)? {
        EndPointHash::Sha224 => sha2::Sha224::digest(der).to_vec(),
        EndPointHash::Sha256 => sha2::Sha256::digest(der).to_vec(),
        EndPointHash::Sha384 => sha2::Sha384::digest(der).to_vec(),
        EndPointHash::Sha512 => sha2::Sha512::digest(der).to_vec(),
    })
}

// DER contents of the OIDs we map (X.690 encoding, no tag or length).
const RSA_MD5: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04];
const RSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05];
const RSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
const RSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
const RSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
const RSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
const RSA_SHA224: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e];
const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
const ECDSA_SHA224: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x01];
const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const ECDSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
const SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
const SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
const SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];
const SHA224: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04];

/// The hash of a certificate's `signatureAlgorithm` (RFC 5280 section
/// 4.1.1.2), with MD5 and SHA-1 raised to SHA-256 as RFC 5929 says.
fn signature_hash(der: &[u8]) -> Option<EndPointHash> {
    use EndPointHash::*;
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (cert, _) = der_tlv(der, 0x30)?;
    let (_tbs, rest) = der_tlv(cert, 0x30)?;
    let (alg, _) = der_tlv(rest, 0x30)?;
    let (oid, params) = der_tlv(alg, 0x06)?;
    Some(match oid {
        RSA_MD5 | RSA_SHA1 | ECDSA_SHA1 => Sha256,
        RSA_SHA224 | ECDSA_SHA224 => Sha224,
        RSA_SHA256 | ECDSA_SHA256 => Sha256,
        RSA_SHA384 | ECDSA_SHA384 => Sha384,
        RSA_SHA512 | ECDSA_SHA512 => Sha512,
        RSA_PSS => {
            // RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] DEFAULT sha1, ... }
            let (pss, _) = der_tlv(params, 0x30)?;
            match der_tlv(pss, 0xa0) {
                None => Sha256,
                Some((hash, _)) => {
                    let (hash_alg, _) = der_tlv(hash, 0x30)?;
                    let (hash_oid, _) = der_tlv(hash_alg, 0x06)?;
                    match hash_oid {
                        SHA1 | SHA256 => Sha256,
                        SHA224 => Sha224,
                        SHA384 => Sha384,
                        SHA512 => Sha512,
                        _ => return None,
                    }
                }
            }
        }
        _ => return None,
    })
}

/// One DER element with tag `tag` at the start of `input`: its contents and
/// what follows. `None` for another tag or a truncated or malformed element.
fn der_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_der(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let p256 = cert_der(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(signature_hash(&p256), Some(EndPointHash::Sha256));
        assert_eq!(
            tls_server_end_point(&p256),
            Some(sha2::Sha256::digest(&p256).to_vec())
        );
        let p384 = cert_der(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(signature_hash(&p384), Some(EndPointHash::Sha384));
        assert_eq!(
            tls_server_end_point(&p384).map(|h| h.len()),
            Some(48),
            "SHA-384 digest"
        );
        // Ed25519 has no hash to bind with
        let ed = cert_der(&rcgen::PKCS_ED25519);
        assert_eq!(signature_hash(&ed), None);
    }

    #[test]
    fn truncated_certificates_give_none_at_every_offset() {
        let der = cert_der(&rcgen::PKCS_ECDSA_P256_SHA256);
        for cut in 0..der.len() {
            // the outer length no longer fits: never a panic, never a hash
            assert_eq!(signature_hash(&der[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn verify_modes_need_a_root_certificate() {
        let mut p = ConnParams::parse_with_env(
            "host=db.example sslmode=verify-full sslrootcert=/nonexistent/root.crt",
            &|_| None,
        )
        .unwrap();
        let e = build_config(&p).unwrap_err();
        assert!(
            e.to_string()
                .contains("/nonexistent/root.crt does not exist"),
            "{e}"
        );
        // require does not verify when the file is missing, as in libpq
        p.sslmode = SslMode::Require;
        assert!(build_config(&p).is_ok());
    }
}

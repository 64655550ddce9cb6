//! Outbound TLS: the policy a destination gets, and the rustls client configurations (ring
//! provider) behind each.
//!
//! Plain MX delivery stays opportunistic by default (RFC 7435): MX hosts often present
//! certificates for another name or self-signed ones, and refusing them would only push the
//! mail to clear text. Under `opportunistic` and `require` the chain and name are not checked —
//! as Postfix's `may` and `encrypt` — but the handshake signature still is, so the session key
//! is agreed with the holder of the presented key. Under `verify` (the smart host's default) the
//! chain must lead to a trusted root (the system's, or the configured CA file) and name the
//! host we meant to reach; nothing is sent otherwise, and there is no clear-text retry.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How a destination's connections use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// STARTTLS when offered, any certificate; clear text when not offered or it fails.
    #[default]
    Opportunistic,
    /// Encrypted or nothing, any certificate (`require_tls`).
    Require,
    /// Encrypted, with a certificate chain to a trusted root naming the host.
    Verify,
}

impl TlsPolicy {
    pub fn parse(s: &str) -> Result<TlsPolicy, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "opportunistic" | "may" => Ok(TlsPolicy::Opportunistic),
            "require" | "encrypt" => Ok(TlsPolicy::Require),
            "verify" | "secure" => Ok(TlsPolicy::Verify),
            other => Err(format!("{other:?} is not opportunistic, require or verify")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Require => "require",
            TlsPolicy::Verify => "verify",
        }
    }

    /// No TLS (or a failed handshake) means no delivery.
    pub fn required(self) -> bool {
        self != TlsPolicy::Opportunistic
    }
}

/// Accepts any certificate, but checks the handshake signature against it. The DANE verifier
/// delegates its signature checks here too.
#[derive(Debug)]
pub(super) struct AnyCertificate(pub(super) Arc<CryptoProvider>);

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
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client configurations, built once per RemoteDelivery actor.
pub struct TlsConfigs {
    /// Any certificate (opportunistic, require).
    pub any: Arc<rustls::ClientConfig>,
    /// Chain and name checked (verify); `None` when no trusted root could be loaded, so such
    /// destinations fail with a reason instead of the daemon refusing to start.
    pub verified: Result<Arc<rustls::ClientConfig>, String>,
}

impl TlsConfigs {
    pub fn new(ca_file: Option<&Path>) -> Result<TlsConfigs, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let any = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client configuration: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.clone())))
            .with_no_client_auth();
        let verified = roots(ca_file).and_then(|roots| {
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("certificate verifier: {e}"))?;
            let c = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS client configuration: {e}"))?
                .with_webpki_verifier(verifier)
                .with_no_client_auth();
            Ok(Arc::new(c))
        });
        if let (Err(e), Some(path)) = (&verified, ca_file) {
            // A CA file the operator named and we cannot use is a configuration error.
            return Err(format!("delivery.ca_file {}: {e}", path.display()));
        }
        Ok(TlsConfigs { any: Arc::new(any), verified })
    }
}

/// The trusted roots: the CA file when configured (only it), else the system's store.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| e.to_string())?
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err("no certificate in it".into());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "no trusted root certificates on this system (install ca-certificates or set delivery.ca_file){}",
                    found.errors.first().map(|e| format!(": {e}")).unwrap_or_default()
                ));
            }
        }
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names() {
        for (text, want) in [
            ("opportunistic", Ok(TlsPolicy::Opportunistic)),
            ("May", Ok(TlsPolicy::Opportunistic)),
            ("require", Ok(TlsPolicy::Require)),
            ("encrypt", Ok(TlsPolicy::Require)),
            (" verify ", Ok(TlsPolicy::Verify)),
            ("secure", Ok(TlsPolicy::Verify)),
        ] {
            assert_eq!(TlsPolicy::parse(text), want, "{text}");
        }
        assert!(TlsPolicy::parse("none").is_err());
        assert!(TlsPolicy::Verify.required() && TlsPolicy::Require.required() && !TlsPolicy::Opportunistic.required());
    }
}

//! A subscription's client certificate for mutual TLS (`tls_client_cert`, `tls_client_key`).
//!
//! Parsed and checked once when the subscription is prepared: the PEM chain and key must parse and
//! belong together (rustls checks that the key's public half is the leaf's), and the leaf's `notAfter`
//! is read so the API and metrics can warn before it expires. The key never leaves this type except
//! into rustls; `Debug` shows only the fingerprint and the expiry.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Certificates expiring within this long are reported (health API, metric).
pub const EXPIRY_WARNING_SECS: i64 = 14 * 24 * 3600;

pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The leaf certificate's `notAfter`, unix seconds.
    pub not_after: i64,
    /// First 16 hex digits of SHA-256 over the chain and key: tells identities apart in the connection
    /// pool and the TLS configuration cache without holding key material there.
    pub fingerprint: Box<str>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// From PEM text. Errors name the field they are about.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<ClientIdentity, (&'static str, String)> {
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ("tls_client_cert", format!("is not PEM certificates ({e})")))?;
        let Some(leaf) = chain.first() else {
            return Err((
                "tls_client_cert",
                "holds no \"BEGIN CERTIFICATE\" block".into(),
            ));
        };
        let not_after = not_after(leaf).ok_or((
            "tls_client_cert",
            "is not an X.509 certificate (no validity found)".to_string(),
        ))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            (
                "tls_client_key",
                format!("is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
            )
        })?;
        // Let rustls judge the pair exactly as it will when connecting.
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls_client_cert", e.to_string()))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            (
                "tls_client_key",
                format!("does not fit tls_client_cert: {e}"),
            )
        })?;
        let mut h = Sha256::new();
        for c in &chain {
            h.update(c.as_ref());
        }
        h.update(key.secret_der());
        let fingerprint = hex::encode(&h.finalize()[..8]).into();
        Ok(ClientIdentity {
            chain,
            key,
            not_after,
            fingerprint,
        })
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// True when the certificate expires within [`EXPIRY_WARNING_SECS`] of `now` (unix seconds), or
    /// has expired.
    pub fn expiring(&self, now: i64) -> bool {
        self.not_after - now <= EXPIRY_WARNING_SECS
    }
}

/// `notAfter` of a DER X.509 certificate as unix seconds: Certificate → tbsCertificate → (version,)
/// serialNumber, signature, issuer, validity → notAfter (UTCTime or GeneralizedTime, UTC).
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
    }
    for want in [0x02, 0x30, 0x30] {
        // serialNumber, signature, issuer
        let (tag, _, r) = tlv(rest)?;
        if tag != want {
            return None;
        }
        rest = r;
    }
    let (0x30, validity, _) = tlv(rest)? else {
        return None;
    };
    let (_, _, r) = tlv(validity)?; // notBefore
    let (tag, time, _) = tlv(r)?;
    let text = std::str::from_utf8(time).ok()?;
    let full = match tag {
        // UTCTime YYMMDDHHMMSSZ: years 50–99 are 19xx (RFC 5280 §4.1.2.5.1).
        0x17 if text.len() == 13 => {
            let yy: u32 = text.get(..2)?.parse().ok()?;
            format!("{}{text}", if yy >= 50 { "19" } else { "20" })
        }
        0x18 if text.len() == 15 => text.to_string(),
        _ => return None,
    };
    let f = full.strip_suffix('Z')?;
    if !f.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |a: usize, b: usize| f.get(a..b).and_then(|s| s.parse::<i64>().ok());
    let (y, mo, d) = (n(0, 4)?, n(4, 6)?, n(6, 8)?);
    let (h, mi, s) = (n(8, 10)?, n(10, 12)?, n(12, 14)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s)
}

/// One DER element at the start of `b`: (tag, contents, the bytes after it). Short tags only, lengths
/// up to 4 bytes.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |l, x| (l << 8) | usize::from(*x));
        b = &b[n..];
        len
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(not_after: (i32, u8, u8)) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn expiry_is_read_from_the_certificate() {
        // 2049 is the last year of UTCTime; 2050 and later are GeneralizedTime.
        for (date, want) in [
            ((2027, 3, 1), 1_803_859_200),
            ((2049, 12, 31), 2_524_521_600),
            ((2051, 6, 15), 2_570_400_000),
        ] {
            let (cert, key) = issue(date);
            let id = ClientIdentity::from_pem(&cert, &key).unwrap();
            assert_eq!(id.not_after, want, "{date:?}");
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn bad_pairs_name_their_field() {
        let (cert, key) = issue((2030, 1, 1));
        let (_, other_key) = issue((2030, 1, 1));
        let e = ClientIdentity::from_pem(&cert, &other_key).unwrap_err();
        assert_eq!(e.0, "tls_client_key", "{e:?}");
        assert_eq!(
            ClientIdentity::from_pem("nope", &key).unwrap_err().0,
            "tls_client_cert"
        );
        assert_eq!(
            ClientIdentity::from_pem(&cert, "nope").unwrap_err().0,
            "tls_client_key"
        );
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(
            ClientIdentity::from_pem(garbage, &key).unwrap_err().0,
            "tls_client_cert"
        );
        // Truncated DER never panics.
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        for n in 0..der.len() {
            let _ = not_after(&der[..n]);
        }
    }

    #[test]
    fn debug_shows_no_key_material_and_expiry_warns_two_weeks_ahead() {
        let (cert, key) = issue((2030, 1, 1));
        let id = ClientIdentity::from_pem(&cert, &key).unwrap();
        let dbg = format!("{id:?}");
        assert!(
            dbg.contains(&*id.fingerprint) && !dbg.contains("key:"),
            "{dbg}"
        );
        assert!(!id.expiring(id.not_after - EXPIRY_WARNING_SECS - 1));
        assert!(id.expiring(id.not_after - EXPIRY_WARNING_SECS));
        assert!(id.expiring(id.not_after + 1));
        // Same material, same fingerprint; another key, another.
        let again = ClientIdentity::from_pem(&cert, &key).unwrap();
        assert_eq!(again.fingerprint, id.fingerprint);
        let (cert2, key2) = issue((2030, 1, 1));
        assert_ne!(
            ClientIdentity::from_pem(&cert2, &key2).unwrap().fingerprint,
            id.fingerprint
        );
    }
}

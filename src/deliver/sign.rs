//! Standard Webhooks 1.0 signatures over `"{id}.{timestamp}.{body}"`, space-separated, one per key:
//! `v1,<base64(HMAC-SHA256(secret, msg))>` for each secret and `v1a,<base64(Ed25519(key, msg))>` for
//! each asymmetric signing key. Keys are prepared once per subscription ([`SigningKey`],
//! [`Ed25519Key`]); HMAC signing clones the prepared state, so no key material is derived per request.
//! Ed25519 needs the whole message at once (it hashes it twice), so a `v1a` signature costs one copy of
//! the body besides the signing itself; subscriptions without signing keys never pay it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::Mac;
use http::header::HeaderValue;

use crate::model::{Ed25519Key, SigningKey};

/// The `webhook-signature` header value for one request: the `v1,` signatures of `keys`, then the
/// `v1a,` signatures of `ed_keys`.
pub fn signature_header<'a>(
    keys: impl IntoIterator<Item = &'a SigningKey>,
    ed_keys: impl IntoIterator<Item = &'a Ed25519Key>,
    msg_id: &[u8],
    timestamp: u64,
    body: &[u8],
) -> HeaderValue {
    let mut ts_buf = itoa::Buffer::new();
    let ts = ts_buf.format(timestamp).as_bytes();
    let mut out = String::with_capacity(96);
    for key in keys {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("v1,");
        let mut mac = key.0.clone();
        mac.update(msg_id);
        mac.update(b".");
        mac.update(ts);
        mac.update(b".");
        mac.update(body);
        STANDARD.encode_string(mac.finalize().into_bytes(), &mut out);
    }
    let mut msg = Vec::new();
    for key in ed_keys {
        if msg.is_empty() {
            msg = signed_message(msg_id, ts, body);
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("v1a,");
        STANDARD.encode_string(key.0.sign(&msg), &mut out);
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).expect("base64 is a valid header value")
}

/// True when any `v1,` signature in `header` is valid for `key` (constant-time comparison).
pub fn verify(key: &SigningKey, msg_id: &[u8], timestamp: u64, header: &str, body: &[u8]) -> bool {
    let mut ts_buf = itoa::Buffer::new();
    let ts = ts_buf.format(timestamp).as_bytes();
    header.split_ascii_whitespace().any(|part| {
        let Some(b64) = part.strip_prefix("v1,") else {
            return false;
        };
        let Ok(sig) = STANDARD.decode(b64) else {
            return false;
        };
        let mut mac = key.0.clone();
        mac.update(msg_id);
        mac.update(b".");
        mac.update(ts);
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    })
}

/// `{id}.{timestamp}.{body}` in one buffer.
fn signed_message(msg_id: &[u8], ts: &[u8], body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(msg_id.len() + ts.len() + body.len() + 2);
    msg.extend_from_slice(msg_id);
    msg.push(b'.');
    msg.extend_from_slice(ts);
    msg.push(b'.');
    msg.extend_from_slice(body);
    msg
}

/// True when any `v1a,` signature in `header` is a valid Ed25519 signature by `public_key`.
pub fn verify_v1a(
    public_key: &[u8; 32],
    msg_id: &[u8],
    timestamp: u64,
    header: &str,
    body: &[u8],
) -> bool {
    use ring::signature::{ED25519, UnparsedPublicKey};
    let mut ts_buf = itoa::Buffer::new();
    let msg = signed_message(msg_id, ts_buf.format(timestamp).as_bytes(), body);
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    header.split_ascii_whitespace().any(|part| {
        part.strip_prefix("v1a,")
            .and_then(|b64| STANDARD.decode(b64).ok())
            .is_some_and(|sig| key.verify(&msg, &sig).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test vector from the Standard Webhooks reference libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: u64 = 1614265330;
    const BODY: &str = r#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_reference_vector() {
        let k = SigningKey::parse(SECRET).unwrap();
        assert_eq!(
            signature_header(
                std::slice::from_ref(&k),
                [],
                ID.as_bytes(),
                TS,
                BODY.as_bytes()
            ),
            SIG
        );
        assert!(verify(&k, ID.as_bytes(), TS, SIG, BODY.as_bytes()));
    }

    #[test]
    fn every_secret_signs_and_tampering_fails() {
        let k1 = SigningKey::parse(SECRET).unwrap();
        let k2 = SigningKey::parse("whsec_dGhpcyBpcyBhIHNlY29uZCBzZWNyZXQ=").unwrap();
        let h = signature_header(
            &[k1.clone(), k2.clone()],
            [],
            ID.as_bytes(),
            TS,
            BODY.as_bytes(),
        );
        let s = h.to_str().unwrap();
        assert_eq!(s.split(' ').count(), 2);
        assert!(s.starts_with(SIG));
        assert!(verify(&k1, ID.as_bytes(), TS, s, BODY.as_bytes()));
        assert!(verify(&k2, ID.as_bytes(), TS, s, BODY.as_bytes()));
        assert!(!verify(&k1, ID.as_bytes(), TS + 1, s, BODY.as_bytes()));
        assert!(!verify(&k1, b"other", TS, s, BODY.as_bytes()));
        assert!(!verify(&k1, ID.as_bytes(), TS, s, b"{}"));
        assert!(!verify(&k1, ID.as_bytes(), TS, "v1,!!!", BODY.as_bytes()));
        assert!(!verify(&k1, ID.as_bytes(), TS, "", BODY.as_bytes()));
    }

    // RFC 8032 §7.1, test 2 (seed, public key, and the signature of the one-byte message 0x72) pins the
    // primitive and the key formats; the header form is then checked with verify_v1a. An independent
    // implementation (PyNaCl) verifies real deliveries in tests/signing.rs.
    #[test]
    fn ed25519_matches_rfc8032_and_v1a_verifies() {
        use base64::engine::general_purpose::STANDARD;
        let seed = hex::decode("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
            .unwrap();
        let key = Ed25519Key::parse(&format!("whsk_{}", STANDARD.encode(&seed))).unwrap();
        assert_eq!(
            hex::encode(key.0.sign(&[0x72]).as_ref()),
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
        );
        assert_eq!(
            key.public_key(),
            format!(
                "whpk_{}",
                STANDARD.encode(
                    hex::decode("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
                        .unwrap()
                )
            )
        );
        let public = crate::model::parse_public_key(&key.public_key()).unwrap();
        let hmac = SigningKey::parse(SECRET).unwrap();
        let h = signature_header(
            std::slice::from_ref(&hmac),
            std::slice::from_ref(&key),
            ID.as_bytes(),
            TS,
            BODY.as_bytes(),
        );
        let s = h.to_str().unwrap();
        let parts: Vec<&str> = s.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], SIG, "the v1 signature is unchanged beside v1a");
        assert!(parts[1].starts_with("v1a,"));
        assert!(verify_v1a(&public, ID.as_bytes(), TS, s, BODY.as_bytes()));
        assert!(
            !verify_v1a(&public, ID.as_bytes(), TS, SIG, BODY.as_bytes()),
            "v1 is not v1a"
        );
        assert!(!verify_v1a(
            &public,
            ID.as_bytes(),
            TS + 1,
            s,
            BODY.as_bytes()
        ));
        assert!(!verify_v1a(
            &public,
            ID.as_bytes(),
            TS,
            s,
            b"{\"test\": 2432232315}"
        ));
        let other = Ed25519Key::parse(&crate::model::generate_signing_key().unwrap()).unwrap();
        let other_public = crate::model::parse_public_key(&other.public_key()).unwrap();
        assert!(!verify_v1a(
            &other_public,
            ID.as_bytes(),
            TS,
            s,
            BODY.as_bytes()
        ));
        // v1a alone: no HMAC secret.
        let only = signature_header(
            [],
            std::slice::from_ref(&key),
            ID.as_bytes(),
            TS,
            BODY.as_bytes(),
        );
        assert!(
            only.to_str().unwrap().starts_with("v1a,") && !only.to_str().unwrap().contains(' ')
        );
        // The 64-byte seed‖public form is the same key; a mismatched public half is refused.
        let mut long = seed.clone();
        long.extend(public);
        assert_eq!(
            Ed25519Key::parse(&format!("whsk_{}", STANDARD.encode(&long)))
                .unwrap()
                .public_key(),
            key.public_key()
        );
        long[40] ^= 1;
        assert!(Ed25519Key::parse(&format!("whsk_{}", STANDARD.encode(&long))).is_err());
        assert!(Ed25519Key::parse("whsec_AAAA").is_err());
        assert!(Ed25519Key::parse(&format!("whsk_{}", STANDARD.encode([0u8; 31]))).is_err());
    }
}

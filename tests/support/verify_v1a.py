"""Verifies the `v1a` (Ed25519) signatures of recorded webhook requests with PyNaCl (libsodium), an
implementation independent of hookline's (ring), using only public keys.

usage: verify_v1a.py REQUESTS.json PUBLIC_KEY [PUBLIC_KEY ...]
REQUESTS.json: [{"headers": {...}, "body_b64": "..."}]. PUBLIC_KEY: `whpk_<base64 of 32 bytes>`.
For each key and request: valid when any `v1a,` signature in `webhook-signature` verifies over
`{webhook-id}.{webhook-timestamp}.{body}`; the same request with the body's last byte changed is also
checked (it must never verify). Prints one JSON line:
{key: {"valid": n, "invalid": m, "tampered_valid": t}}.
"""
import base64
import json
import sys

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey


def verifies(key, msg, header):
    for part in header.split():
        if not part.startswith("v1a,"):
            continue
        try:
            key.verify(msg, base64.b64decode(part[4:]))
            return True
        except (BadSignatureError, ValueError):
            pass
    return False


requests = json.load(open(sys.argv[1]))
result = {}
for text in sys.argv[2:]:
    if not text.startswith("whpk_"):
        sys.exit(f"not a public key: {text}")
    key = VerifyKey(base64.b64decode(text[len("whpk_"):]))
    counts = {"valid": 0, "invalid": 0, "tampered_valid": 0}
    for r in requests:
        h = {k.lower(): v for k, v in r["headers"].items()}
        body = base64.b64decode(r["body_b64"])
        prefix = f'{h["webhook-id"]}.{h["webhook-timestamp"]}.'.encode()
        sig = h.get("webhook-signature", "")
        counts["valid" if verifies(key, prefix + body, sig) else "invalid"] += 1
        tampered = body[:-1] + bytes([body[-1] ^ 1]) if body else b"x"
        if verifies(key, prefix + tampered, sig):
            counts["tampered_valid"] += 1
    result[text] = counts
print(json.dumps(result))

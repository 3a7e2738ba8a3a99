"""Verifies recorded webhook requests with the unmodified `standardwebhooks` package (PyPI).

usage: verify_standardwebhooks.py REQUESTS.json SECRET [SECRET ...]
REQUESTS.json: [{"headers": {...}, "body_b64": "..."}]. Each secret is tried alone on every request.
Prints one JSON line: {secret: {"valid": n, "invalid": m}}.
"""
import base64
import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

requests = json.load(open(sys.argv[1]))
result = {}
for secret in sys.argv[2:]:
    wh = Webhook(secret)
    counts = {"valid": 0, "invalid": 0}
    for r in requests:
        body = base64.b64decode(r["body_b64"])
        try:
            wh.verify(body, r["headers"], json_parse=False)
            counts["valid"] += 1
        except WebhookVerificationError as e:
            counts["invalid"] += 1
    result[secret] = counts
print(json.dumps(result))

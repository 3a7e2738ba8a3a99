"""Demo receiver: verifies each delivery with the reference `standardwebhooks` library and prints it.

usage: demo-receiver.py PORT SECRET [HOST]   (HOST defaults to 127.0.0.1; the compose file uses 0.0.0.0)
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

port, secret = int(sys.argv[1]), sys.argv[2]
host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
wh = Webhook(secret)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            wh.verify(body, dict(self.headers), json_parse=False)
            event = json.loads(body)
            print(f"verified delivery {self.path}: {event.get('type')} {event.get('id')} "
                  f"(webhook-id {self.headers['webhook-id']})", flush=True)
            status = 204
        except (WebhookVerificationError, ValueError) as e:
            print(f"REJECTED delivery {self.path}: {e}", flush=True)
            status = 400
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


ThreadingHTTPServer((host, port), Handler).serve_forever()

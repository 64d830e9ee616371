"""A notification receiver: an HTTP server on a free port that keeps every JSON body POSTed to
it, reached through Apprise's json:// scheme."""
from __future__ import annotations

import http.server
import json
import threading


class Webhook:
    def __init__(self, address: str = "127.0.0.1"):
        self.received: list[dict] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                hook.received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.url = f"json://{address}:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

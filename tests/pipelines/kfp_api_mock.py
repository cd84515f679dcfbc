"""A stand-in for the KFP API server (the one part of a cluster that cannot run here).

It answers the few v2beta1 endpoints kfp.Client uses to submit runs and records what it
received, so tests can check the compiled pipeline, the arguments and the bearer token.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class KfpApiMock:
    def __init__(self, final_state: str = "SUCCEEDED"):
        self.requests: list[dict] = []
        self.final_state = final_state
        self.experiments: dict[str, dict] = {}
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, body: dict, code: int = 200):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}") if n else {}
                mock.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "body": body,
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                return body

            def do_GET(self):
                self._record()
                if self.path.startswith("/apis/v2beta1/healthz"):
                    return self._reply({"commit_sha": "mock", "tag_name": "2.17.0", "multi_user": False})
                if self.path.startswith("/apis/v2beta1/experiments"):
                    return self._reply(
                        {"experiments": list(mock.experiments.values()), "total_size": len(mock.experiments)}
                    )
                if self.path.startswith("/apis/v2beta1/runs/"):
                    run_id = self.path.rsplit("/", 1)[-1].split("?")[0]
                    return self._reply({"run_id": run_id, "state": mock.final_state, "display_name": "r"})
                return self._reply({"error": "not found"}, 404)

            def do_POST(self):
                body = self._record()
                if self.path.startswith("/apis/v2beta1/experiments"):
                    exp = {"experiment_id": str(uuid.uuid4()), "display_name": body.get("display_name")}
                    mock.experiments[exp["experiment_id"]] = exp
                    return self._reply(exp)
                if self.path.startswith("/apis/v2beta1/runs"):
                    return self._reply({"run_id": str(uuid.uuid4()), "state": "PENDING", **body})
                if self.path.startswith("/apis/v2beta1/recurringruns"):
                    return self._reply({"recurring_run_id": str(uuid.uuid4()), **body})
                return self._reply({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

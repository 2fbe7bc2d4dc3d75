"""A model server under Vertex AI's custom-container contract, for the stand-in's tests: it
listens on AIP_HTTP_PORT, answers AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE, and echoes the
deployed model id and its whole environment in each prediction."""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

if os.environ.get("ECHO_EXIT_AT_START"):
    print(f"echo: refusing to start: {os.environ['ECHO_EXIT_AT_START']}", flush=True)
    sys.exit(3)
PORT = int(os.environ["AIP_HTTP_PORT"])
HEALTH = os.environ["AIP_HEALTH_ROUTE"]
PREDICT = os.environ["AIP_PREDICT_ROUTE"]
NEVER_READY = os.environ.get("ECHO_NEVER_READY") == "1"


class Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True

    def send(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        if self.path == HEALTH:
            self.send(503 if NEVER_READY else 200, {"ready": not NEVER_READY})
        else:
            self.send(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.path != PREDICT:
            self.send(404, {"error": f"no route {self.path}"})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        deployed = os.environ["AIP_DEPLOYED_MODEL_ID"]
        predictions = [{"deployed": deployed, "instance": i} for i in body["instances"]]
        self.send(200, {"predictions": predictions, "metadata": {"env": dict(os.environ)}})

    def log_message(self, format: str, *args: object) -> None:
        pass


print(f"echo: serving on 127.0.0.1:{PORT}", flush=True)
HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()

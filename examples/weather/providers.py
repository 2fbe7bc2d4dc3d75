"""Two synthetic weather providers' hourly observations, served as JSON on 127.0.0.1.

Both answer `{"data": {"hourly": [...]}}`, so one IngestRequest with records path
`data.hourly` merges them; the temperature follows the hour of day, cloud cover and humidity.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATIONS = {"a": ["lyon", "nantes", "lille"], "b": ["porto", "braga"]}


START = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def observations(
    provider: str, days: int = 6, seed: int = 0, start: dt.datetime = START
) -> list[dict[str, object]]:
    rng = random.Random(f"{provider}-{seed}")
    rows: list[dict[str, object]] = []
    for station in STATIONS[provider]:
        base = rng.uniform(12, 20)
        for h in range(days * 24):
            at = start + dt.timedelta(hours=h)
            cloud = rng.uniform(0, 1)
            humidity = round(rng.uniform(35, 95), 1)
            daily = 6 * math.sin((at.hour - 9) / 24 * 2 * math.pi)
            temp = base + daily * (1 - 0.6 * cloud) - 0.05 * (humidity - 60) + rng.gauss(0, 0.7)
            rows.append(
                {
                    "provider": provider,
                    "station": station,
                    "observed_at": at.isoformat().replace("+00:00", "Z"),
                    "hour": at.hour,
                    "humidity": humidity,
                    "cloud_cover": round(cloud, 2),
                    "wind_ms": round(rng.uniform(0, 12), 1),
                    "temp_c": round(temp, 2),
                }
            )
    return rows


class Providers:
    """A local HTTP server answering /a and /b with each provider's JSON; stop() ends it."""

    def __init__(self, days: int = 6) -> None:
        bodies = {
            f"/{p}": json.dumps({"data": {"hourly": observations(p, days)}}).encode()
            for p in STATIONS
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = bodies.get(self.path.split("?")[0])
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a free port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def urls(self) -> list[str]:
        port = self.server.server_address[1]
        return [f"http://127.0.0.1:{port}/{p}" for p in STATIONS]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

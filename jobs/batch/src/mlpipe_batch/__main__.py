"""`python -m mlpipe_batch --spec JSON [Beam pipeline options]`: run one batch job.

A spec whose `job` is `validate_dataset` (mlpipe.messaging.validation_jobs) is a large
landing's validation (mlpipe_batch.validate): exit status 0 once its verdict is written,
valid or not, 1 when the job itself broke.

The predictor's local launcher starts this as a process (DirectRunner); the Dataflow launcher
starts the same entry point in a Flex Template's launcher (DataflowRunner). Exit status: 0 the
metrics are written, 2 the batch failed (its failure record says why), 1 the job itself broke
(recorded as `internal`). A failed batch's outputs are removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mlpipe.errors import PermanentError
from mlpipe.messaging.batch_jobs import JobSpec, record_failure
from mlpipe.messaging.validation_jobs import ValidationSpec, is_validation
from mlpipe_batch.pipeline import remove_outputs, run, storage_for

log = logging.getLogger("mlpipe_batch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlpipe_batch", description=__doc__)
    parser.add_argument("--spec", required=True, help="the JobSpec, JSON")
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    worker_image = os.environ.get("MLPIPE_BATCH_WORKER_IMAGE", "")
    if worker_image and not any(a.startswith("--sdk_container_image") for a in beam_args):
        # On Dataflow (the job's image): the workers run the same image as the launcher.
        beam_args.append(f"--sdk_container_image={worker_image}")
    if is_validation(args.spec):
        return validate(ValidationSpec.from_json(args.spec), beam_args)
    spec = JobSpec.from_json(args.spec)
    storage = storage_for(spec)
    try:
        metrics = run(spec, beam_args)
    except PermanentError as exc:
        record_failure(storage, spec, exc.reason, exc.message)
        metrics = None
    except Exception as exc:
        if storage.exists(spec.metrics_path):
            # Only publishing failed: the batch is complete, and the predictor's step
            # publishes its completion when the request is redelivered.
            log.warning(
                "batch %s: complete, but its event was not published: %s", spec.batch_id, exc
            )
            return 0
        # A DoFn that failed recorded its reason first; this one stands only if none did.
        record = record_failure(storage, spec, "internal", f"the batch job failed: {exc}")
        log.error("batch %s failed: %s", spec.batch_id, record["message"])
        remove_outputs(storage, spec)
        return 1 if record["reason"] == "internal" else 2
    failure = storage.read_json(spec.failure_path)
    if failure is not None:
        remove_outputs(storage, spec)
        log.error("batch %s failed: %s", spec.batch_id, failure["message"])
        return 2
    if metrics is not None:
        log.info(
            "batch %s: %d rows in %.1fs",
            spec.batch_id,
            metrics["rows"],
            metrics["duration_seconds"],
        )
    return 0


def validate(spec: ValidationSpec, beam_args: list[str]) -> int:
    from mlpipe_batch import validate as validation

    try:
        verdict = validation.run(spec, beam_args)
    except Exception:
        # No verdict: ingest's check finds the job ended without one and reports it.
        log.exception("validation %s of %s broke", spec.export_id, spec.input_uri)
        return 1
    if verdict is not None:
        log.info("validation %s of %s: valid=%s", spec.export_id, spec.input_uri, verdict["valid"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

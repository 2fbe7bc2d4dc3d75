"""Imported last by the training forkserver (see launcher.PRELOAD): reads, splits and fits a
tiny dataset once through the training path, so that every job forked from it starts with the
first-call costs (lazy imports, pandas' and scikit-learn's first paths) already paid.

A failure here must not take the forkserver down: the jobs then only start colder.
"""

from __future__ import annotations

import logging

from mlpipe.ml.modeling import warm_up_model

try:
    warm_up_model()
except Exception:  # the jobs still run; they pay the first-call costs themselves
    logging.getLogger(__name__).warning("training warm-up failed", exc_info=True)

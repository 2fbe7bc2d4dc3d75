"""The evaluator's settings (MLPIPE_* environment variables): the common ones only, so far."""

from __future__ import annotations

from mlpipe.runtime.settings import CommonSettings


class EvaluatorSettings(CommonSettings):
    """Everything the evaluator reads from its environment. It needs nothing beyond the
    settings every service has; a setting of its own goes here."""

"""mlpipe: shared library of the event-driven ML pipeline."""

__version__ = "0.1.0"

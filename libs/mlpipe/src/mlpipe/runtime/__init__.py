"""What every service runs on: push adapter, settings, auth, logs, failures, errors."""

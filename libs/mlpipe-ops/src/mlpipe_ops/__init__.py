"""mlpipe operator side: the mlpipe CLI, infra plan/apply, the local stack and its containers."""

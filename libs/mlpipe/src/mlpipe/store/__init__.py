"""The bucket: the storage client, the layout of run paths, and the model registry."""

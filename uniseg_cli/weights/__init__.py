"""Data only: the model registry (``registry.json``) and bundled model folders."""

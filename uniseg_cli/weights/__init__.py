"""Weights: the model registry (``registry.json``, licences, bundled models), model specs and the Hub,
the user's model store and settings, downloads and installs, model cards."""

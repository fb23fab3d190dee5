"""Weights: reading the model registry (its data, ``registry.json``, the licences and the bundled models,
is the top-level ``weights/`` folder, installed as ``uniseg_cli.weights_data``), model specs and the Hub,
the user's model store and settings, downloads and installs, model cards."""

"""The model data uniseg ships: ``registry.json`` (every named model: where it comes from, its files'
hashes, its licence), ``licenses/`` (the licence texts shown before a download) and the bundled
``uniseg-demo`` model folder.

This folder is data, not code. It is installed inside the package as ``uniseg_cli.weights_data``
(``pyproject.toml``: ``package-dir``), so that an installed uniseg finds it with ``importlib.resources``;
the code that reads it is ``uniseg_cli/weights/``.
"""

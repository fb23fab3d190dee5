"""uniseg: prompt-driven universal 3D medical image segmentation (UniSeg) as a command-line toolkit.

Importing the package is cheap: torch is loaded only when a model is built or loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "save_model", "UniSegConfig", "UnisegError"]

if TYPE_CHECKING:
    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.errors import UnisegError
    from uniseg_cli.model.files import load_model, save_model


def __getattr__(name: str) -> Any:
    # Lazy exports keep `import uniseg_cli` (and `uniseg --help`) free of torch.
    if name in ("load_model", "save_model"):
        from uniseg_cli.model import files

        return getattr(files, name)
    if name == "UniSegConfig":
        from uniseg_cli.config import UniSegConfig

        return UniSegConfig
    if name == "UnisegError":
        from uniseg_cli.errors import UnisegError

        return UnisegError
    raise AttributeError(f"module 'uniseg_cli' has no attribute {name!r}")

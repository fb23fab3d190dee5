"""Model folders: ``config.json`` + ``model.safetensors``, Hugging Face's layout.

This is the only way weights are read: safetensors holds tensors and nothing executable, and the
shapes are checked against the configuration before anything is copied into the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from uniseg_cli.config import UniSegConfig
from uniseg_cli.errors import ConfigError, ModelFileError
from uniseg_cli.io.atomic import atomic_directory, usual_permissions
from uniseg_cli.model.network import UniSeg
from uniseg_cli.weights.hub import CONFIG_NAME, WEIGHTS_NAME, model_paths

#: What a model folder uniseg writes holds (``--force`` may replace a folder of these even if it was
#: written before folders carried their manifest).
MODEL_FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md", "manifest.json")


def save_model(model: UniSeg, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` (its config and float weights) as a model folder, atomically."""
    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite, ours=MODEL_FOLDER_FILES) as tmp:
        write_model_files(model, tmp)
    return folder


def write_model_files(model: UniSeg, folder: Path, *, dtype: torch.dtype = torch.float32) -> None:
    """Write the two files into an existing (temporary) folder; callers make it atomic."""
    (folder / CONFIG_NAME).write_text(model.config.to_json(), encoding="utf-8")
    write_weights(model, folder / WEIGHTS_NAME, dtype=dtype)


def write_weights(model: UniSeg, path: Path, *, dtype: torch.dtype = torch.float32) -> None:
    """``model.safetensors`` in ``dtype`` (float32, or float16 for a half-size copy); readers get float32."""
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    usual_permissions(path)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> UniSeg:
    """The network of a model folder, in eval mode on ``device``, with ``model.config`` set.

    Accepts the folder or its ``model.safetensors``. A file whose tensors do not match the
    configuration is refused with the names and shapes that differ.
    """
    config_path, weights_path = model_paths(path)
    try:
        config = UniSegConfig.from_json_file(config_path)
    except ConfigError as exc:
        raise ModelFileError(str(exc)) from None
    state = read_safetensors(weights_path)
    corrupt = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if corrupt:  # a network with NaN weights gives a plausible-looking empty map, not an error
        raise ModelFileError(f"{weights_path}: {len(corrupt)} tensor(s) hold NaN or infinite values "
                             f"({corrupt[0]}{', …' if len(corrupt) > 1 else ''}); the weights are corrupt")
    with torch.device("meta"):
        model = UniSeg(config)
    check_state_dict(model, state, source=str(weights_path))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as float32 on the CPU."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k).float() for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Refuse a state dict whose names or shapes differ from ``model``'s, naming the first few."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k}: file {got[k]}, config {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong)):
        if items:
            shown = "; ".join(items[:3]) + (f"; … {len(items) - 3} more" if len(items) > 3 else "")
            problems.append(f"{len(items)} tensor(s) {label} ({shown})")
    if problems:
        raise ModelFileError(f"{source}: does not match its configuration: " + ", ".join(problems))

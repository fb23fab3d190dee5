"""Converting the published nnU-Net v1 checkpoint into a safetensors model folder, safely.

The published ``model_final_checkpoint.model`` and its ``.model.pkl`` plans are Python pickles,
which can run arbitrary code when unpickled. They are read only through allow-lists: torch's
weights-only loader for the checkpoint, a restricted unpickler for the plans; anything else they ask
for is refused with its name. The configuration is inferred from the tensor shapes (the weights are
the truth); the plans, when given, are a cross-check.
"""

from __future__ import annotations

import collections
import logging
import math
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniseg_cli.config import UniSegConfig
from uniseg_cli.errors import CheckpointError, ModelFileError, first_line
from uniseg_cli.io.atomic import atomic_directory
from uniseg_cli.model.files import MODEL_FOLDER_FILES, check_state_dict, load_model, write_model_files
from uniseg_cli.model.network import UniSeg
from uniseg_cli.tasks import UPSTREAM_TASKS

log = logging.getLogger(__name__)

try:  # numpy >= 2 moved numpy.core to numpy._core; pickles carry either name.
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _numpy_globals() -> dict[str, Any]:
    """The numpy names a checkpoint or plans file may use: scalars, arrays and dtypes, nothing callable beyond."""
    allowed: dict[str, Any] = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for core in ("numpy.core", "numpy._core"):
        allowed[f"{core}.multiarray.scalar"] = _multiarray.scalar
        allowed[f"{core}.multiarray._reconstruct"] = _multiarray._reconstruct
        allowed[f"{core}.numeric._frombuffer"] = _numeric._frombuffer
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            allowed[f"numpy.dtypes.{name}"] = cls
    return allowed


SAFE_GLOBALS: dict[str, Any] = {
    **_numpy_globals(),
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "_codecs.encode": __import__("codecs").encode,
}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an nnU-Net v1 checkpoint (or of a bare pickled state dict), loaded weights-only."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the checkpoint file itself (nnU-Net v1: "
                              "model_final_checkpoint.model, beside its .model.pkl)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: is empty (0 bytes; an interrupted download or copy?)")
    safe = [(obj, name) for name, obj in SAFE_GLOBALS.items()]
    try:
        with torch.serialization.safe_globals(safe), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the pickle protocol, not the user's concern
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused (nothing in it was run): {_refusal(path, str(exc))}") from None
    except EOFError:
        raise CheckpointError(f"{path}: ends early after {path.stat().st_size} bytes (truncated?)") from None
    except Exception as exc:  # a corrupt file fails anywhere inside torch's parser (KeyError, …)
        reason = ("a damaged zip archive: truncated or corrupted" if "PytorchStreamReader" in str(exc)
                  else f"{type(exc).__name__}: {first_line(exc)}")
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if isinstance(data, Mapping) and "state_dict" in data:
        epoch = data.get("epoch")
        log.info("read %s (nnU-Net v1 checkpoint%s)", path.name, f", epoch {epoch}" if epoch is not None else "")
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: holds no state dict (expected a dict with 'state_dict', or a dict of tensors)")
    state = {str(k): v for k, v in data.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_plans(path: str | Path) -> dict[str, Any]:
    """An nnU-Net v1 plans pickle (``.model.pkl`` or ``plans.pkl``) through the allow-list."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = _RestrictedUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused (nothing in it was run): {exc}") from None
    except Exception as exc:  # truncated or foreign data fails anywhere inside the unpickler
        raise CheckpointError(f"{path}: not a readable plans pickle ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: not an nnU-Net plans file (top level is {type(data).__name__})")
    plans = data.get("plans", data)
    if not isinstance(plans, Mapping) or "plans_per_stage" not in plans:
        raise CheckpointError(f"{path}: not an nnU-Net v1 plans file (no 'plans_per_stage')")
    stages = plans["plans_per_stage"]
    if not isinstance(stages, Mapping) or not stages or not all(isinstance(v, Mapping) for v in stages.values()):
        raise CheckpointError(f"{path}: not an nnU-Net v1 plans file ('plans_per_stage' is not a dict of stages)")
    init = data.get("init")
    stage = init[5] if isinstance(init, (tuple, list)) and len(init) > 5 and init[5] in stages else max(stages)
    return {**plans, "stage": stage}


class _RestrictedUnpickler(pickle.Unpickler):
    """Python's documented way to unpickle untrusted data: only allow-listed globals resolve."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[f"{module}.{name}"]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which is not on uniseg's allow-list of plain data types"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses persistent ids, which plain plans files do not")


def _refusal(path: Path, message: str) -> str:
    """Why the weights-only loader refused a file, naming the global it asked for.

    torch's own message leads with the advice to turn its weights-only check off, which would run the
    file's code; for newer pickle protocols it names only an opcode. The pickle's instructions are listed
    (not run) to find the first global outside the allow-list.
    """
    match = re.search(r"GLOBAL ([\w.]+)", message)
    name = match.group(1) if match else _first_foreign_global(path)
    if name is not None:
        return f"it asks for {name}, which is not on uniseg's allow-list of plain data types"
    detail = message.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in message else ""
    detail = " ".join(detail.split()).split(" Check the documentation")[0]
    return "it is not a plain weights pickle" + (f" ({detail})" if detail else "")


def _first_foreign_global(path: Path) -> str | None:
    """The first ``module.name`` a pickle (or a torch zip's ``data.pkl``) imports that is neither torch's
    nor on the allow-list; read with ``pickletools``, which decodes instructions without running them."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                payload = archive.read(member) if member else b""
        else:
            payload = path.read_bytes()
        strings: list[str] = []
        for opcode, argument, _ in pickletools.genops(payload):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(argument))
            found = (str(argument).replace(" ", ".") if opcode.name in ("GLOBAL", "INST")
                     else ".".join(strings[-2:]) if opcode.name == "STACK_GLOBAL" and len(strings) >= 2 else None)
            if found and not found.startswith("torch.") and found not in SAFE_GLOBALS:
                return found
    except Exception:  # an unreadable pickle: torch's reason is all there is
        return None
    return None


def infer_config(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> UniSegConfig:
    """Rebuild the configuration from the tensor shapes alone; the result is checked against all tensors."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: not a UniSeg checkpoint ({key} is missing)")
        return tuple(state[key].shape)

    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"conv_blocks_context\.(\d+)\.", k))})
    if len(stages) < 2 or stages != list(range(len(stages))):
        raise CheckpointError(f"{source}: not a UniSeg checkpoint (encoder stages {stages})")
    n = len(stages)
    first = "conv_blocks_context.0.blocks.0"
    inputs = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(rf"{re.escape(first)}\.conv_(\d+)\.weight", k)))
    if not inputs:
        raise CheckpointError(f"{source}: not a UniSeg checkpoint (no {first}.conv_<n> input convolutions)")
    convs = len({k.split(".")[3] for k in state if k.startswith("conv_blocks_context.0.blocks.")})
    stem = [shape(f"{first}.conv_{inputs[0]}.weight")]
    stem += [shape(f"conv_blocks_context.{d}.blocks.0.conv.weight") for d in range(1, n - 1)]
    stem += [shape(f"conv_blocks_context.{n - 1}.0.blocks.0.conv.weight")]
    features = [s[0] for s in stem]
    pool = tuple(shape(f"tu.{u}.weight")[2:] for u in range(n - 1))[::-1]
    prompt = shape("intermedia_prompt")
    stride = [math.prod(k[axis] for k in pool) for axis in range(3)]
    base, top = features[0], max(features)
    if features != [min(base * 2**d, top) for d in range(n)]:
        raise CheckpointError(f"{source}: features per stage {features} do not follow UniSeg's doubling rule")
    num_tasks = prompt[1]
    if num_tasks != len(UPSTREAM_TASKS):
        raise CheckpointError(
            f"{source}: the checkpoint has {num_tasks} task prompts; only the {len(UPSTREAM_TASKS)} upstream tasks "
            "of the published model are known for legacy checkpoints"
        )
    config = UniSegConfig(
        patch_size=tuple(p * s for p, s in zip(prompt[2:], stride)),  # type: ignore[arg-type]
        base_features=base,
        max_features=top,
        pool_kernels=pool,  # type: ignore[arg-type]
        conv_kernels=tuple(s[2:] for s in stem),  # type: ignore[arg-type]
        convs_per_stage=convs,
        num_classes=shape("seg_outputs.0.weight")[0],
        input_channels=tuple(inputs),
        tasks=UPSTREAM_TASKS,
    )
    with torch.device("meta"):
        check_state_dict(UniSeg(config), state, source=source)
    return config


def compare_with_plans(config: UniSegConfig, plans: Mapping[str, Any]) -> list[str]:
    """Where the plans disagree with the configuration read off the weights (empty when they agree)."""
    stage = plans["plans_per_stage"][plans["stage"]]

    def triples(value: Any) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(v) for v in k) for k in value)

    checks = [
        ("patch_size", tuple(int(v) for v in stage.get("patch_size", ())), config.patch_size),
        ("pool_op_kernel_sizes", triples(stage.get("pool_op_kernel_sizes", ())), config.pool_kernels),
        ("conv_kernel_sizes", triples(stage.get("conv_kernel_sizes", ())), config.conv_kernels),
    ]
    if "base_num_features" in plans:
        checks.append(("base_num_features", int(plans["base_num_features"]), config.base_features))
    if "conv_per_stage" in plans:
        checks.append(("conv_per_stage", int(plans["conv_per_stage"]), config.convs_per_stage))
    return [f"{name}: plans {got}, weights {want}" for name, got, want in checks if got != want]


@dataclass
class ImportReport:
    """What ``import_checkpoint`` did, for the CLI to print."""

    output: Path
    config: UniSegConfig
    tensors: int
    parameters: int
    max_abs_diff: float
    plans_disagreements: list[str] = field(default_factory=list)


def import_checkpoint(checkpoint: str | Path, output: str | Path, *, plans: str | Path | None = None,
                      device: torch.device | str = "cpu", overwrite: bool = False,
                      source: str = "", license: str = "",
                      check: Callable[[UniSegConfig, Mapping[str, torch.Tensor]], None] | None = None,
                      annotate: Callable[[Path, ImportReport], None] | None = None) -> ImportReport:
    """Convert a legacy checkpoint to a model folder and prove the folder computes the same logits.

    The folder is written to a temporary name, reloaded through the normal loader and run on the
    same random patch as the raw state dict; only if every tensor is bit-identical and the outputs
    agree does it get its final name. ``check(config, state)`` may refuse the weights before anything
    is written (a release pins its exact layout); ``annotate(folder, report)`` adds files (model card,
    manifest) to the temporary folder, so that they appear together with the weights or not at all.
    """
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint)
    config = infer_config(state, source=str(checkpoint))
    config = config.with_changes(source=source or f"converted from {checkpoint.name}", license=license)
    if check is not None:
        check(config, state)
    disagreements = compare_with_plans(config, read_plans(plans)) if plans is not None else []
    for line in disagreements:
        log.warning("plans disagree with the weights (the weights win): %s", line)
    with torch.device("meta"):
        raw = UniSeg(config)
    raw.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    raw = raw.to(device).eval()
    with atomic_directory(output, overwrite=overwrite, ours=MODEL_FOLDER_FILES) as tmp:
        write_model_files(raw, tmp)
        saved = load_model(tmp, device=device)
        for key, tensor in raw.state_dict().items():
            if not torch.equal(tensor, saved.state_dict()[key]):
                raise ModelFileError(f"{output}: tensor {key} changed when written; nothing was saved")
        diff = forward_difference(raw, saved, device=torch.device(device))
        if diff > 1e-4:
            raise ModelFileError(f"{output}: the saved model's logits differ by {diff:.3g} from the checkpoint's; nothing was saved")
        report = ImportReport(output=Path(output), config=config, tensors=len(state),
                              parameters=sum(p.numel() for p in raw.parameters()), max_abs_diff=diff,
                              plans_disagreements=disagreements)
        if annotate is not None:
            annotate(tmp, report)
    return report


def forward_difference(a: UniSeg, b: UniSeg, *, device: torch.device, task: int = 0) -> float:
    """Largest absolute logit difference of two networks on one seeded random patch."""
    config = a.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, min(config.input_channels), *config.patch_size, generator=generator).to(device)
    with torch.inference_mode():
        return float((a(x, task) - b(x, task)).abs().max())

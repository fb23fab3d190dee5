"""Time `uniseg weights import`, or `uniseg weights download uniseg-11task`, at the published size (not a test).

Writes an nnU-Net v1-format checkpoint (state dict, SGD state with momentum buffers, numpy training
curves, AMP scaler state) of the published configuration with freshly initialised weights, then runs
the real command on it and reports wall time, peak RSS of the command and the file sizes. With
``--download`` the checkpoint and its ``.model.pkl`` are served by a mirror on 127.0.0.1 and the
command is the one users run for the published weights (licence accepted, download, layout check,
conversion, install into a fresh store).

    python benchmarks/import_checkpoint.py [--device cpu|cuda] [--workdir DIR] [--download]
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from uniseg_cli.config import UniSegConfig
from uniseg_cli.model.network import UniSeg


def write_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = UniSeg(UniSegConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    for p in model.parameters():  # momentum buffers as a trained checkpoint has them
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    torch.save({
        "epoch": 1000,
        "state_dict": OrderedDict(model.state_dict()),
        "optimizer_state_dict": optimizer.state_dict(),
        "lr_scheduler_state_dict": None,
        "plot_stuff": ([np.float64(0.1)] * 1000, [np.float64(0.2)] * 1000, [], [np.float64(0.8)] * 1000),
        "best_stuff": (990, np.float64(-0.7), np.float64(0.8), np.float64(0.8)),
        "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 0},
    }, path)


def write_plans(path: Path) -> None:
    """The ``.model.pkl`` nnU-Net v1 writes beside the checkpoint: init arguments, trainer name, plans."""
    stage = {"batch_size": 2, "patch_size": np.array([64, 192, 192]),
             "pool_op_kernel_sizes": [[1, 2, 2]] + [[2, 2, 2]] * 4, "conv_kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 5}
    path.write_bytes(pickle.dumps({"init": ("plans.pkl", 0, "out", "data", True, 1), "name": "UniSegTrainer",
                                   "plans": {"plans_per_stage": {1: stage}, "base_num_features": 32,
                                             "conv_per_stage": 2, "num_classes": 3}}, protocol=4))


def serve(folder: Path) -> str:
    """A static file server on 127.0.0.1 for ``folder`` (the mirror); returns its URL."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--download", action="store_true", help="Time `uniseg weights download uniseg-11task` from a local mirror.")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="uniseg-import-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "model_final_checkpoint.model"
    write_checkpoint(checkpoint)
    env = dict(os.environ)
    if args.download:
        write_plans(work / "model_final_checkpoint.model.pkl")
        env.update(UNISEG_HOME=str(work / "home"), UNISEG_WEIGHTS_MIRROR=serve(work))
        output = work / "home" / "models" / "uniseg-11task"
        command = [sys.executable, "-m", "uniseg_cli", "weights", "download", "uniseg-11task", "--accept-license",
                   "--device", args.device, "--force"]
    else:
        output = work / "uniseg-11task"
        command = [sys.executable, "-m", "uniseg_cli", "weights", "import", str(checkpoint), "-o", str(output),
                   "--device", args.device, "--force"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise SystemExit(result.returncode)
    weights = output / "model.safetensors"
    print(f"device {args.device}: {'download + install' if args.download else 'import'} took {seconds:.1f} s wall, peak RSS {peak_mib:.0f} MiB; "
          f"checkpoint {checkpoint.stat().st_size / 2**20:.1f} MiB -> model.safetensors "
          f"{weights.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

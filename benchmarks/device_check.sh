#!/usr/bin/env bash
# GPU checks for a CUDA machine (not a test; run by hand): the test suite with CUDA visible, the
# checkpoint import on GPU and CPU, and CUDA-vs-CPU agreement and time of one published-size forward.
# Usage: OUT=results bash benchmarks/device_check.sh   (writes $OUT/device_check.log)
set -uo pipefail
OUT=${OUT:-.}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -5
python3 benchmarks/import_checkpoint.py --device cuda --workdir /tmp/uniseg-import
python3 benchmarks/import_checkpoint.py --device cpu --workdir /tmp/uniseg-import
python3 - <<'PY'
import time, torch
from uniseg_cli import load_model
model = load_model("/tmp/uniseg-import/uniseg-11task", device="cpu")
x = torch.rand(1, 1, *model.config.patch_size, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    t = time.perf_counter(); cpu = model(x, 1); print(f"cpu fp32 forward {time.perf_counter() - t:.2f} s")
    model.cuda()
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        for _ in range(2):
            model(x.cuda(), 1)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(5):
            out = model(x.cuda(), 1)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / 5 * 1000
        diff = (out.cpu() - cpu).abs().max().item()
        same = (out.cpu().argmax(1) == cpu.argmax(1)).float().mean().item()
        print(f"cuda fp32 forward (cudnn tf32={tf32}): {ms:.1f} ms, max |logit diff| vs cpu {diff:.2e}, argmax agreement {same:.6f}")
PY

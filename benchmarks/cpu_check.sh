#!/usr/bin/env bash
# The CPU targets of the bf16 channels-last work, on the machine to be measured (not a test; run by hand):
# which CPU this is and what uniseg picks on it, one published-size pass against the peak measured in the
# same process, the convolutions' bf16 gain per pass direction, --fast's label maps against fp32 on the
# demo model, and `predict` and training steps against nnU-Net v2 (those two need nnunetv2 installed beside
# this torch: `pip install nnunetv2 torch==<this torch> 'torchvision<…>'` so that pip keeps the torch).
# Usage: OUT=results bash benchmarks/cpu_check.sh   (writes $OUT/cpu_check.log)
#        CASES=small STEPS=1 PASSES=1 for a shorter run (predict_vs_nnunet cases, training steps, passes)
set -uo pipefail
OUT=${OUT:-.}
mkdir -p "$OUT"
exec > >(tee "$OUT/cpu_check.log") 2>&1
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
date -u
lscpu | grep -E '^(Model name|CPU family|Model|CPU\(s\)|Thread\(s\) per core|Socket\(s\)):'
echo "flags that matter: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx512_bf16|avx512_fp16|amx_tile|amx_bf16|amx_int8' \
    /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 - <<'PY'
import torch
from uniseg_cli.inference.runtime import choose_precision, onednn_isa_cap, resolve_training_precision
cpu = torch.device("cpu")
print("torch", torch.__version__, "threads", torch.get_num_threads(), "oneDNN cap", onednn_isa_cap() or "none")
for spec in ("auto", "fast"):
    print(f"predict --precision {spec}:", choose_precision(spec, cpu).why)
print("train --precision auto:", resolve_training_precision("auto", cpu))
PY
python3 benchmarks/forward_profile.py --precisions fp32,fast --passes "${PASSES:-2}"
python3 benchmarks/conv_passes.py
python3 benchmarks/precision_agreement.py
if python3 -c "import nnunetv2" 2>/dev/null; then
    python3 benchmarks/predict_vs_nnunet.py --cases "${CASES:-small,huge}" --precision fp32,fast
    python3 benchmarks/train_vs_nnunet.py --steps "${STEPS:-3}" --batch 2
else
    echo "nnunetv2 is not importable: predict_vs_nnunet.py and train_vs_nnunet.py skipped"
fi
date -u

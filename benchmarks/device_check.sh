#!/usr/bin/env bash
# GPU checks for a CUDA machine (not a test; run by hand): the GPU-relevant tests, then throughput of the
# real predictor on the realistic-size CT (precisions, TTA, batching, --task all), then training throughput
# of the published configuration with AMP.
# Usage: OUT=results bash benchmarks/device_check.sh   (writes $OUT/device_check.log and $OUT/throughput.json)
set -uo pipefail
OUT=${OUT:-.}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_network.py tests/test_sliding_window.py tests/test_devices.py tests/test_preprocessing.py tests/test_runtime.py 2>&1 | tail -3
python3 benchmarks/throughput.py --device cuda --large --json "$OUT/throughput.json" \
    --settings ${SETTINGS:-tta,tta-fp16,tta-bf16,fp32,fp16,batch4,all}
python3 benchmarks/batch_pipeline.py --device cuda --large --cases 4 --tta
python3 benchmarks/train_throughput.py --preset published --device cuda --workers 8

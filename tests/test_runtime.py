"""Precision choice and its effect on the sliding window."""

from __future__ import annotations

import pytest
import torch

from uniseg_cli.errors import UsageError
from uniseg_cli.inference.runtime import choose_precision, resolve_precision
from uniseg_cli.labels import Head
from uniseg_cli.inference.sliding_window import WindowOptions, sliding_window


def test_auto_is_faithful_and_fast_takes_bf16_channels_last_only_on_cpus_with_bf16_matrix_units(monkeypatch):
    from uniseg_cli.inference import runtime

    cpu = torch.device("cpu")
    for spec in ("auto", "fast"):
        assert runtime.resolve_precision(spec, torch.device("cuda")) == "fp16"
        assert runtime.resolve_precision(spec, torch.device("mps")) == "fp32"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for amx, avx512_bf16, fast, units in [(True, True, "bf16", "AMX"), (False, True, "bf16", "AVX-512 BF16"),
                                          (False, False, "fp32", "")]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert runtime.cpu_bf16_units() == units
        auto, quick = runtime.choose_precision("auto", cpu), runtime.choose_precision("fast", cpu)
        assert auto.precision == "fp32" and not auto.near_tie   # the published computation on every CPU
        assert (units in auto.why) if units else ("no bf16 matrix units" in auto.why)
        assert quick.precision == fast and not quick.near_tie
        assert runtime.channels_last(quick.precision, cpu) == (fast == "bf16")
        checked = runtime.choose_precision("bf16-checked", cpu)
        assert (checked.precision, checked.near_tie) == ("bf16", runtime.NEAR_TIE_MARGIN)
        assert runtime.resolve_precision("bf16", cpu) == "bf16"
    assert not runtime.channels_last("bf16", torch.device("cuda"))
    with pytest.raises(UsageError, match="--precision must be one of auto, fast, fp32, bf16, bf16-checked, fp16, "
                                         "got 'fp8'"):
        runtime.resolve_precision("fp8", cpu)


def test_a_onednn_isa_cap_below_the_bf16_units_gives_the_choice_of_a_cpu_without_them(monkeypatch):
    from uniseg_cli.inference import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for cap, units in [("", "AMX"), ("AVX512_CORE_AMX", "AMX"), ("avx10_1_512_amx_fp16", "AMX"),
                       ("AVX512_CORE_FP16", "AVX-512 BF16"), ("AVX512_CORE_BF16", "AVX-512 BF16"),
                       ("AVX512_CORE_VNNI", ""), ("AVX2", ""), ("SSE41", ""), ("NOT_AN_ISA", "AMX")]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert runtime.cpu_bf16_units() == units, cap
        assert runtime.resolve_precision("fast", cpu) == ("bf16" if units else "fp32")
        assert runtime.resolve_training_precision("auto", cpu) == ("bf16" if units else "fp32")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN from this CPU's bf16 matrix units (AMX)" in \
        runtime.choose_precision("fast", cpu).why
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")   # oneDNN's older name
    assert runtime.cpu_bf16_units() == ""


def test_training_precision_is_the_recipes_mixed_precision_and_bf16_on_native_cpus(monkeypatch):
    from uniseg_cli.inference import runtime

    assert runtime.resolve_training_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: True)
    assert runtime.resolve_training_precision("auto", torch.device("cpu")) == "bf16"
    assert runtime.resolve_training_precision("auto", torch.device("mps")) == "fp32"
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: False)
    assert runtime.resolve_training_precision("auto", torch.device("cpu")) == "fp32"   # emulated bf16 is slower
    assert runtime.resolve_training_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(UsageError, match=r"--precision fp16 trains on CUDA only \(with a gradient scaler\); cpu can "):
        runtime.resolve_training_precision("fp16", torch.device("cpu"))
    with pytest.raises(UsageError, match="--precision must be one of auto, fp32, bf16, fp16, got 'fast'"):
        runtime.resolve_training_precision("fast", torch.device("cpu"))


def test_bf16_window_accumulates_float32_close_to_fp32(small_model, ct_patch):
    with torch.inference_mode():
        full = sliding_window(small_model, ct_patch[0], [Head(1, 3)], WindowOptions(mirror=False, precision="fp32"))[0]
        half = sliding_window(small_model, ct_patch[0], [Head(1, 3)], WindowOptions(mirror=False, precision="bf16"))[0]
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 and not torch.equal(half, full)


def _allocator_in_fresh_process(env: dict[str, str], *, torch_first: bool = False) -> tuple[str, str]:
    import os
    import subprocess
    import sys

    code = ("import os, sys\n" + ("import torch\n" if torch_first else "")
            + "from uniseg_cli.inference.allocator import tune_allocator\n"
            + "print(tune_allocator(), tune_allocator(), os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)")
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    first, second, variable, torch_loaded = out.stdout.split()
    assert first == second  # chosen once per process
    return first, variable


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc and transparent huge pages")
def test_allocator_uses_huge_pages_when_offered_else_keeps_freed_memory():
    from uniseg_cli.inference.allocator import huge_pages_offered

    chosen, variable = _allocator_in_fresh_process({})
    if huge_pages_offered():
        assert (chosen, variable) == ("huge-pages", "1")  # set before torch could read it
    else:
        assert chosen == "keep-freed" and variable == "None"
    assert _allocator_in_fresh_process({"THP_MEM_ALLOC_ENABLE": "0"}) == ("keep-freed", "0")  # the user's choice
    # once torch is loaded the switch can no longer take effect: keep freed memory instead
    assert _allocator_in_fresh_process({}, torch_first=True) == ("keep-freed", "None")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc and transparent huge pages")
@pytest.mark.parametrize("command,expected", [
    (["predict", "/nonexistent.nii.gz", "-t", "kidney", "-m", "uniseg-demo"], "huge-pages"),  # bounded memory
    (["train", "/nonexistent", "-o", "unused"], "keep-freed"),                                  # hours of the same allocations
    (["finetune", "/nonexistent", "-m", "uniseg-demo"], "keep-freed"),
])
def test_each_command_tunes_its_own_process(command, expected, tmp_path):
    import os
    import subprocess
    import sys

    from uniseg_cli.inference.allocator import huge_pages_offered

    if expected == "huge-pages" and not huge_pages_offered():
        expected = "keep-freed"
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    done = subprocess.run([sys.executable, "-m", "uniseg_cli", "-v", *command], env=environment, cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode != 0 and f"memory for activations: {expected}" in done.stderr


def test_accumulating_elsewhere_gives_the_same_probabilities(small_model, ct_patch):
    with torch.inference_mode():
        here = sliding_window(small_model, ct_patch[0], [Head(1, 3)], WindowOptions(mirror=False))[0]
        there = sliding_window(small_model, ct_patch[0], [Head(1, 3)], WindowOptions(mirror=False),
                               accumulate_on=torch.device("cpu"))[0]
    assert torch.equal(here, there)


def test_out_of_accelerator_memory_falls_back_to_cpu_accumulation_only(coarse_model_dir, ct_volume, monkeypatch,
                                                                       caplog):
    import uniseg_cli.inference.predictor as predictor
    from uniseg_cli.inference.predictor import Segmenter

    segmenter = Segmenter(coarse_model_dir, device="cpu", window=WindowOptions(mirror=False))
    calls = []

    def accelerator_without_room(model, tensor, tasks, options, on_progress=None, accumulate_on=None,
                                 flip_entropy=False):
        calls.append(accumulate_on)
        if accumulate_on is None:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [torch.zeros((head.outputs, *tensor.shape[1:]), device=accumulate_on) for head in tasks]

    monkeypatch.setattr(predictor, "sliding_window", accelerator_without_room)
    # As if the network ran on an accelerator: "meta" stands in for it (tensors go there without memory).
    segmenter.device = torch.device("meta")
    with caplog.at_level("WARNING", logger="uniseg_cli"):
        prediction = segmenter.predict_array(ct_volume, (3.0, 3.0, 3.0), "spleen")
    assert calls == [None, torch.device("cpu")]   # retried with the accumulation, not the network, on the CPU
    assert "accumulating on the CPU (slower; the network stays on meta)" in caplog.text
    assert prediction.labels.shape == ct_volume.shape
    segmenter.device = torch.device("cpu")
    calls.clear()
    with pytest.raises(torch.OutOfMemoryError):   # on the CPU there is nothing to fall back to
        segmenter.predict_array(ct_volume, (3.0, 3.0, 3.0), "spleen")
    assert calls == [None]


def test_preprocessing_runs_on_the_gpu_and_falls_back_to_the_cpu_when_its_memory_is_short(
        coarse_model_dir, ct_volume, monkeypatch, caplog):
    import uniseg_cli.inference.predictor as predictor
    from uniseg_cli.data.preprocessing import preprocess
    from uniseg_cli.inference.predictor import Segmenter

    segmenter = Segmenter(coarse_model_dir, device="cpu", window=WindowOptions(mirror=False))
    devices = []

    def gpu_without_room(*arguments, device="cpu"):
        devices.append(str(device))
        if device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return preprocess(*arguments)

    monkeypatch.setattr(predictor, "preprocess", gpu_without_room)
    prepared = segmenter.prepare_array(ct_volume, (3.0, 3.0, 3.0), "spleen")
    assert devices == ["cpu"]                                  # a CPU network: pre-processing on the CPU
    segmenter.device = torch.device("cuda")                     # as if the network ran on a GPU
    devices.clear()
    with caplog.at_level("WARNING", logger="uniseg_cli"):
        again = segmenter.prepare_array(ct_volume, (3.0, 3.0, 3.0), "spleen")
    assert devices == ["cuda", "cpu"]                          # tried on the GPU first, then the CPU
    assert "out of cuda memory for pre-processing; doing it on the CPU" in caplog.text
    assert torch.equal(again.groups[0][1], prepared.groups[0][1])


def test_one_default_precision_for_the_command_the_api_and_validation(small_model, ct_patch, coarse_model_dir):
    from uniseg_cli.inference.predictor import Segmenter

    assert WindowOptions().precision == "auto"                 # was fp32 here while predict said auto
    choice = choose_precision("auto", torch.device("cpu"))      # bf16 or fp32, by this CPU's units
    window = Segmenter(coarse_model_dir, device="cpu", window=WindowOptions(mirror=False)).window
    assert (window.precision, window.near_tie) == (choice.precision, choice.near_tie)
    with torch.inference_mode():
        auto = sliding_window(small_model, ct_patch[0], [Head(1, 3)], WindowOptions(mirror=False))[0]
        same = sliding_window(small_model, ct_patch[0], [Head(1, 3)], window)[0]
        assert torch.equal(auto, same)
        with pytest.raises(UsageError, match="--precision must be one of"):
            sliding_window(small_model, ct_patch[0], [Head(1, 3)], WindowOptions(precision="fp8"))   # was: silently fp32

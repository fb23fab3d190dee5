"""`uniseg finetune`: both transfer modes on a real dataset, what trains and what stays, evaluation."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

QUICK = ("--epochs", "2", "--batches-per-task", "2", "--target-spacing", "6,6,6", "--no-tta", "--device", "cpu",
         "-j", "0", "-q")


def test_downstream_keeps_the_pretrained_network_and_drops_the_prompt(run_cli, small_model_dir, kidney_dataset, tmp_path):
    out = tmp_path / "ft"
    code, stdout, err = run_cli("finetune", kidney_dataset, "-m", small_model_dir, "-o", out, *QUICK)
    assert code == 0, err
    assert stdout.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"]["prompted"] is False and config["architecture"]["num_classes"] == 2
    assert "mirror_axes" not in config                                          # the pretrained model's: all three
    assert [t["key"] for t in config["tasks"]] == ["kidneyslabs"]
    before, after = load_file(small_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert not any(k.startswith(("intermedia_prompt", "fusion_layer")) for k in after)
    assert after["tu.0.weight"].shape[0] == before["tu.0.weight"].shape[0] - 1   # no prompt-map channel
    assert after["seg_outputs.4.weight"].shape[0] == 2                           # new heads: bg + kidney
    encoder = "conv_blocks_context.1.blocks.0.conv.weight"
    assert not torch.equal(after[encoder], before[encoder])                     # it trained
    assert (after[encoder] - before[encoder]).abs().max() < 0.05                 # … from the pretrained weights

    evaluation = json.loads((out / "evaluation.json").read_text())
    splits = json.loads((out / "splits.json").read_text())["kidneyslabs"]
    assert [c["case"] for c in evaluation["cases"]] == splits[0]["val"]
    assert set(evaluation["summary"]["1"]) == {"dice", "hd95", "nsd"} and evaluation["labels"] == {"1": "kidney"}
    from uniseg_cli.metrics import evaluate as score
    for case in evaluation["cases"]:  # the prediction it names is the map it scored, written beside the model
        assert case["prediction"] == str(out / "validation" / f"{case['case']}.nii.gz")
        again = score(case["prediction"], case["reference"], labels=[1])
        assert again["cases"][0]["labels"]["1"]["dice"] == case["labels"]["1"]["dice"]

    from conftest import CT
    code, _, err = run_cli("predict", CT, "-m", out, "--task", "kidneyslabs", "-o", tmp_path / "k.nii.gz", "--fast", "-q")
    assert code == 0, err


def test_freeze_encoder_keeps_the_encoder(run_cli, small_model_dir, kidney_dataset, tmp_path):
    out = tmp_path / "frozen"
    code, _, err = run_cli("finetune", kidney_dataset, "-m", small_model_dir, "-o", out, "--freeze-encoder", "2",
                           "--fold", "all", *QUICK)
    assert code == 0, err
    before, after = load_file(small_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    encoder = [k for k in after if k.startswith("conv_blocks_context.") and "conv_1" not in k]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    assert not torch.equal(after["conv_blocks_localization.0.0.blocks.0.conv.weight"],
                           before["conv_blocks_localization.0.0.blocks.0.conv.weight"])
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["encoder_frozen"] is True
    assert not (out / "evaluation.json").exists()                              # --fold all: nothing held out


def test_finetune_mirror_axes_are_recorded(run_cli, small_model_dir, kidney_dataset, tmp_path):
    from uniseg_cli import load_model, save_model

    unmirrored = load_model(small_model_dir)
    unmirrored.config = unmirrored.config.with_changes(mirror_axes=())
    unmirrored = save_model(unmirrored, tmp_path / "unmirrored")
    for model, args, axes in ((small_model_dir, ["--mirror-axes", "y,z"], [0, 1]),
                              (small_model_dir, ["--no-augment"], []),
                              (unmirrored, ["--mode", "new-task"], []),       # the upstream tasks keep their TTA
                              (unmirrored, ["--mode", "downstream"], None)):  # a new dataset: all three
        out = tmp_path / "-".join(a.strip("-") for a in args)
        code, _, err = run_cli("finetune", kidney_dataset, "-m", model, "-o", out, *args,
                               "--preprocessed", tmp_path / "prep", "--epochs", "1", "--batches-per-task", "1", *QUICK[4:])
        assert code == 0, err
        assert json.loads((out / "config.json").read_text()).get("mirror_axes") == axes


def test_new_task_with_frozen_upstream_leaves_the_other_tasks_unchanged(run_cli, small_model_dir, kidney_dataset,
                                                                          ct_patch, tmp_path):
    from uniseg_cli import load_model

    out = tmp_path / "grown"
    code, _, err = run_cli("finetune", kidney_dataset, "-m", small_model_dir, "-o", out, "--mode", "new-task",
                           "--freeze-upstream", "--task-name", "kidney_slabs", *QUICK)
    assert code == 0, err
    before, after = load_model(small_model_dir), load_model(out)
    assert [t.key for t in after.config.tasks][:11] == [t.key for t in before.config.tasks]
    assert after.config.tasks[11].key == "kidney_slabs" and after.config.tasks[11].id == 11
    assert after.config.fusion_features == before.config.fusion_features
    with torch.inference_mode():
        for task in range(11):
            # the same weights (checked bit for bit below); the logits to float32 rounding, as the wider fusion
            # convolution (one more, zero-weighted input) sums in another order: a few 1e-6 on some CPUs
            torch.testing.assert_close(after(ct_patch, task), before(ct_patch, task), rtol=1e-5, atol=2e-5)
    new, old = after.state_dict(), before.state_dict()
    assert torch.equal(new["intermedia_prompt"][:, :11], old["intermedia_prompt"])
    last = "fusion_layer.blocks.2.conv.weight"
    assert torch.equal(new[last][:11], old[last]) and new[last].shape[0] == 12
    fresh = _fresh_new_task_row(small_model_dir, out)
    assert not torch.equal(new[last][11], fresh)                                # the new task's map trained
    assert torch.count_nonzero(new["fusion_layer.blocks.0.conv.weight"][:, -1]) == 0
    code, _, err = run_cli("predict", __import__("conftest").CT, "-m", out, "--task", "kidney_slabs",
                           "-o", tmp_path / "k.nii.gz", "--fast", "-q")
    assert code == 0, err


def _fresh_new_task_row(pretrained_dir, out):
    """The new task's fusion row as initialised (seed 0), before training."""
    from uniseg_cli import load_model
    from uniseg_cli.training.finetune import new_task_model

    task = load_model(out).config.tasks[-1]
    surgery = new_task_model(load_model(pretrained_dir), task, freeze_upstream=True, seed=0)
    return surgery.model.state_dict()["fusion_layer.blocks.2.conv.weight"][11]


def test_new_task_without_freezing_trains_everything(small_model_dir, kidney_prep, tmp_path):
    from uniseg_cli import load_model
    from uniseg_cli.data.training_cache import read_plan
    from uniseg_cli.training.finetune import new_task_model
    from uniseg_cli.training.trainer import TrainOptions, train

    data = read_plan(kidney_prep)[0]
    surgery = new_task_model(load_model(small_model_dir), data.task, freeze_upstream=False)
    train(kidney_prep, tmp_path / "all", config=surgery.model.config, init_state=surgery.model.state_dict(),
          trainable=surgery.trainable, options=TrainOptions(epochs=1, batches_per_task=2, fold="all", workers=0,
                                                            device="cpu", progress=False))
    after = load_file(tmp_path / "all/model.safetensors")
    old = load_file(small_model_dir / "model.safetensors")
    assert not torch.equal(after["fusion_layer.blocks.2.conv.weight"][:11], old["fusion_layer.blocks.2.conv.weight"])


def test_finetune_errors(run_cli, small_model_dir, kidney_dataset, tmp_path):
    import shutil

    import nibabel as nib

    root = tmp_path / kidney_dataset.name
    shutil.copytree(kidney_dataset, root)
    label = nib.load(root / "labelsTr/ct0.nii.gz")
    data = np.asarray(label.dataobj).copy()
    data[1, 1, 1] = 7
    nib.save(nib.Nifti1Image(data, label.affine), root / "labelsTr/ct0.nii.gz")
    code, _, err = run_cli("finetune", root, "-m", small_model_dir, "-o", tmp_path / "x", *QUICK)
    assert code == 1 and "labelsTr/ct0.nii.gz: label value(s) [7] are not declared in dataset.json" in err
    assert not (tmp_path / "x").exists()

    code, _, err = run_cli("finetune", kidney_dataset, "-m", small_model_dir, "-o", tmp_path / "y",
                           "--mode", "new-task", "--task-name", "kidney", *QUICK)
    assert code == 2 and "already has a task 'kidney'" in err
    code, _, err = run_cli("finetune", kidney_dataset, "-m", small_model_dir, "--freeze-upstream", *QUICK)
    assert code == 2 and "--freeze-upstream applies to --mode new-task" in err


def test_a_new_channel_count_gets_a_new_input_convolution():
    """A 2-channel dataset on a model with conv_1 and conv_4 only: a fresh conv_2, said in the log."""
    import dataclasses

    from uniseg_cli.config import small_config
    from uniseg_cli.model.network import UniSeg
    from uniseg_cli.tasks import resolve_task
    from uniseg_cli.training.finetune import downstream_model

    tasks = tuple(dataclasses.replace(resolve_task(k), id=i) for i, k in enumerate(("kidney", "brain_tumor")))
    pretrained = UniSeg(small_config(tasks=tasks, input_channels=(1, 4)))
    surgery = downstream_model(pretrained, dataclasses.replace(resolve_task("pet_lesion"), key="ctpet"))
    assert any("no input convolution for 2 channel(s)" in note for note in surgery.notes)
    assert surgery.model.config.input_channels == (2,)
    assert "conv_blocks_context.0.blocks.0.conv_2.weight" in surgery.model.state_dict()


def test_rerun_reuses_the_preprocessing_and_resume_continues(run_cli, small_model_dir, kidney_dataset, tmp_path):
    out = tmp_path / "ft"
    args = ("finetune", kidney_dataset, "-m", small_model_dir, "-o", out, "--batches-per-task", "2",
            "--target-spacing", "6,6,6", "--no-tta", "--device", "cpu", "-j", "0", "-q", "--fold", "all")
    code, _, err = run_cli(*args, "--epochs", "1")
    assert code == 0, err
    cached = tmp_path / "ft-preprocessed" / "kidneyslabs" / "ct0.npy"
    stamp = cached.stat().st_mtime_ns
    code, _, err = run_cli(*args, "--epochs", "2", "--resume")
    assert code == 0, err
    assert cached.stat().st_mtime_ns == stamp                                   # not pre-processed again
    epochs = [json.loads(line).get("epoch") for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [e for e in epochs if e is not None] == [1, 2]


def test_workers_step_and_the_default_model_reach_their_steps(run_cli, small_model_dir, kidney_dataset, tmp_path,
                                                              monkeypatch):
    # -j was ignored by pre-processing and the evaluation's step was fixed at 0.5; without -m the
    # default model is used and named in the model's source.
    from uniseg_cli.training import finetune as finetuning

    seen = {}
    real = finetuning.preprocess_datasets

    def preprocess(*args, **kwargs):
        seen["workers"] = kwargs["workers"]
        return real(*args, **kwargs)

    def train(cache, output, *, config, **kwargs):
        seen["source"] = config.source
        return None

    def evaluate(output, data, options, tolerance, *, window, accept_implausible=False):
        seen["window"] = window
        return None

    monkeypatch.setattr(finetuning, "preprocess_datasets", preprocess)
    monkeypatch.setattr(finetuning, "train", train)
    monkeypatch.setattr(finetuning, "evaluate_validation", evaluate)
    monkeypatch.setenv("UNISEG_MODEL", str(small_model_dir))
    code, _, err = run_cli("finetune", kidney_dataset, "-o", tmp_path / "ft", "-j", "1", "--step", "0.75", "--no-tta",
                           "-q")
    assert code == 0, err
    assert seen["workers"] == 1 and seen["window"].step == 0.75 and not seen["window"].mirror
    assert f"from {small_model_dir} on" in seen["source"]

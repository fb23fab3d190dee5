"""The task registry: plain data, no torch, names users type."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from uniseg_cli.errors import UnknownNameError
from uniseg_cli.tasks import UPSTREAM_TASKS, resolve_task


def test_the_eleven_upstream_tasks():
    assert [t.key for t in UPSTREAM_TASKS] == [
        "liver", "kidney", "hepatic_vessel", "pancreas", "colon", "lung", "spleen", "vertebrae", "prostate",
        "brain_tumor", "pet_lesion"]
    assert [t.id for t in UPSTREAM_TASKS] == list(range(11))
    # The merged "all tasks" map of docs/pipeline.md §2 has 17 foreground labels.
    assert sum(len(t.labels) for t in UPSTREAM_TASKS) == 17
    brain = resolve_task("brain_tumor")
    assert [c.name for c in brain.channels] == ["T1", "T1ce", "T2", "FLAIR"] and brain.target_spacing == (1, 1, 1)
    pet = resolve_task("pet_lesion")
    assert [c.normalization for c in pet.channels] == ["ct", "zscore"] and pet.target_spacing == (8, 4, 4)
    assert resolve_task("vertebrae").target_spacing == (4, 2, 2)
    assert resolve_task("liver").channels[0].window == (-325, 325)


@pytest.mark.parametrize("spec", ["kidney", "kidn", "1", "KIDNEY", " kits ", 1])
def test_a_task_is_selected_by_key_alias_or_id(spec):
    assert resolve_task(spec).key == "kidney"


def test_an_unknown_task_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="unknown task 'kidny'; did you mean 'kidney'"):
        resolve_task("kidny")
    with pytest.raises(UnknownNameError, match="valid: .*liver"):
        resolve_task("xyz")


def test_listing_tasks_and_help_do_not_import_torch():
    code = ("import sys; from uniseg_cli.cli import main; import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['tasks']); main(['tasks', '--json'])\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_tasks_command_prints_a_table_and_json(run_cli):
    code, out, _ = run_cli("tasks")
    assert code == 0 and "kidney" in out and "kidn" in out and "FLAIR" in out
    code, out, _ = run_cli("tasks", "--json")
    listed = json.loads(out)
    assert code == 0 and len(listed) == 11 and listed[9]["labels"] == ["edema", "non-enhancing tumour", "enhancing tumour"]


def test_tasks_command_lists_a_models_own_tasks(run_cli, tmp_path, small_model):
    from uniseg_cli import save_model

    save_model(small_model, tmp_path / "m")
    code, out, _ = run_cli("tasks", "--json", "--model", tmp_path / "m")
    assert code == 0 and [t["key"] for t in json.loads(out)] == [t.key for t in UPSTREAM_TASKS]
    code, _, err = run_cli("tasks", "--model", tmp_path)
    assert code == 1 and err.strip() == f"Error: {tmp_path}: not a model folder (config.json is missing)"

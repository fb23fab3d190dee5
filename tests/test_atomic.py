"""Atomic outputs: a replaced folder survives a failure to put the new one in place."""

from __future__ import annotations

import pytest

from uniseg_cli.io import atomic


def test_a_failed_replacement_restores_the_old_folder(tmp_path, monkeypatch):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "config.json").write_text("old")

    def refuse(tmp, target, *, folder=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "publish", refuse)
    with pytest.raises(OSError):
        with atomic.atomic_directory(dest, overwrite=True, ours=("config.json",)) as tmp:
            (tmp / "config.json").write_text("new")
    assert (dest / "config.json").read_text() == "old"            # was: left hidden as .model.PID.old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_successful_replacement_leaves_only_the_new_folder(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    with atomic.atomic_directory(dest, overwrite=True, ours=("config.json",)) as tmp:
        (tmp / "config.json").write_text("new")
    assert (dest / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in dest.iterdir()) == [atomic.FOLDER_MANIFEST, "config.json"]
    (dest / "notes.txt").write_text("the user's")                  # not uniseg's: never replaced
    with pytest.raises(atomic.UnisegError, match="holds notes.txt, which uniseg did not write there"):
        with atomic.atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "config.json").write_text("newer")
    assert (dest / "config.json").read_text() == "new" and (dest / "notes.txt").exists()


def test_outputs_of_one_case_appear_together_or_not_at_all(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError):
        with atomic.atomic_files() as outputs:
            outputs.add(tmp_path / "labels.nii.gz").write_text("labels")
            outputs.add(tmp_path / "probabilities.npz").write_text("half")
            raise RuntimeError("the second writer failed")
    assert list(tmp_path.iterdir()) == []

    real = atomic.publish
    def full_disk_on_the_second(tmp, dest, *, folder=False):
        if dest.name == "probabilities.npz":   # published second, after the labels
            raise OSError(28, "No space left on device")
        real(tmp, dest, folder=folder)

    monkeypatch.setattr(atomic, "publish", full_disk_on_the_second)
    with pytest.raises(atomic.UnisegError, match=r"probabilities.npz: cannot write \(No space left on device\)$"):
        with atomic.atomic_files() as outputs:
            outputs.add(tmp_path / "labels.nii.gz").write_text("labels")
            outputs.add(tmp_path / "probabilities.npz").write_text("probabilities")
    assert list(tmp_path.iterdir()) == []      # the labels already moved into place were removed again

    (tmp_path / "labels.nii.gz").write_text("earlier labels")
    (tmp_path / "probabilities.npz").write_text("earlier probabilities")
    with pytest.raises(atomic.UnisegError):
        with atomic.atomic_files() as outputs:
            outputs.add(tmp_path / "labels.nii.gz").write_text("new labels")
            outputs.add(tmp_path / "probabilities.npz").write_text("new probabilities")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "labels.nii.gz": "earlier labels", "probabilities.npz": "earlier probabilities"}   # both restored whole


def test_a_killed_runs_temporary_files_are_removed_by_the_next_write_of_the_same_output(tmp_path):
    leftovers = [tmp_path / ".k.nii.gz.x1y2.partial.nii.gz", tmp_path / ".model.abc.partial"]
    leftovers[0].write_text("half")
    leftovers[1].mkdir()
    (leftovers[1] / "config.json").write_text("{")
    other_job = tmp_path / ".other.nii.gz.q9.partial.nii.gz"    # another shard's output, in progress
    other_job.write_text("in progress")
    with atomic.atomic_file(tmp_path / "k.nii.gz", suffix=".nii.gz") as tmp:
        tmp.write_text("whole")
    with atomic.atomic_directory(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.nii.gz.q9.partial.nii.gz", "k.nii.gz", "model"]

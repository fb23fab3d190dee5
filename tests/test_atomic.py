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
        with atomic.atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
    assert (dest / "config.json").read_text() == "old"            # was: left hidden as .model.PID.old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_successful_replacement_leaves_only_the_new_folder(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    with atomic.atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (dest / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

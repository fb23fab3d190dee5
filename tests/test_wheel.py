"""The wheel carries the model data: built from the checkout, installed into a fresh virtual environment,
``uniseg weights list`` shows the registry and ``-m uniseg-demo`` predicts, from outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import CT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with only the built wheel installed, the wheel). The dependencies (torch, …)
    come from this interpreter's site-packages through a path file, so nothing is downloaded but the
    build backend."""
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(work / "dist")],
                           capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and "Could not find a version that satisfies" in built.stderr:
        pytest.skip("the build backend (setuptools) cannot be fetched here: no package registry")
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((work / "dist").glob("uniseg_cli-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "venv")], check=True)
    python = work / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # installed before the dependencies become visible: pip would otherwise find this interpreter's own
    # uniseg-cli through them and install nothing
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True, timeout=600)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, wheel


def test_the_wheel_holds_the_model_data_under_the_package(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("uniseg_cli/weights_data/registry.json", "uniseg_cli/weights_data/licenses/UniSeg-LICENSE.txt",
                 "uniseg_cli/weights_data/uniseg-demo/model.safetensors",
                 "uniseg_cli/weights_data/uniseg-demo/config.json", "uniseg_cli/weights/hub.py"):
        assert name in names
    assert not [n for n in names if n.startswith("weights/")]          # no top-level package named weights


def test_an_installed_wheel_lists_the_registry_and_predicts_with_the_demo(installed, tmp_path):
    python, _ = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UNISEG_MODEL")}
    env["UNISEG_HOME"] = str(tmp_path / "home")

    def uniseg(*args):
        return subprocess.run([str(python), "-m", "uniseg_cli", *map(str, args)], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=600)

    where = subprocess.run([str(python), "-c", "import uniseg_cli; print(uniseg_cli.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env).stdout
    assert str(python.parents[1]) in where                             # the wheel's copy, not the checkout
    listed = uniseg("weights", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {"uniseg-11task", "uniseg-demo"} <= {m["name"] for m in json.loads(listed.stdout)}
    result = uniseg("predict", CT, "-t", "kidney", "-m", "uniseg-demo", "--fast", "--device", "cpu", "-o",
                    tmp_path / "k.nii.gz", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["labels"][0]["voxels"] > 1000

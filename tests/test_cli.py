"""The command itself: entry points, help, version, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from uniseg_cli import __version__


def test_version_and_help(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"uniseg {__version__}"
    code, out, _ = run_cli("--help")
    assert code == 0 and "Examples:" in out and "uniseg tasks --json" in out
    assert "tasks" in out and "weights" in out


def test_usage_errors_exit_2(run_cli):
    code, _, err = run_cli("segment-everything")
    assert code == 2 and "No such command" in err
    code, _, err = run_cli("weights", "import")
    assert code == 2 and "Missing argument" in err


def test_python_dash_m_and_console_script_run_the_same_app(tmp_path):
    result = subprocess.run([sys.executable, "-m", "uniseg_cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"uniseg {__version__}"
    result = subprocess.run([sys.executable, "-m", "uniseg_cli", "weights", "import", str(tmp_path / "x.model"),
                             "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"Error: {tmp_path / 'x.model'}: no such file"


@pytest.mark.parametrize("signame,where,code,message", [
    ("SIGINT", "uniseg_cli.inference.predictor:sliding_window", 130, "Error: interrupted"),
    ("SIGTERM", "uniseg_cli.io.atomic:publish", 143, "Error: stopped by SIGTERM"),   # with a temporary file written
])
def test_ctrl_c_and_sigterm_exit_one_line_and_leave_no_partial_output(small_model_dir, tmp_path, signame, where, code,
                                                                      message):
    """Ctrl-C while the network runs, SIGTERM (timeout, Slurm, Kubernetes) while the output is being put in
    place: 128 + the signal, one line, no half-written or temporary file."""
    import subprocess
    import sys

    from conftest import CT

    module, name = where.split(":")
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import importlib, os, signal, sys\n"
        "from uniseg_cli.cli import main\n"
        f"module = importlib.import_module({module!r})\n"
        f"original = module.{name}\n"
        "def interrupted(*args, **kwargs):\n"          # the signal arrives there, every time
        f"    os.kill(os.getpid(), signal.{signame})\n"
        "    return original(*args, **kwargs)\n"
        f"module.{name} = interrupted\n"
        f"sys.exit(main(['predict', {str(CT)!r}, '-t', 'kidney', '-m', {str(small_model_dir)!r}, "
        f"'-o', {str(out / 'k.nii.gz')!r}, '--device', 'cpu', '--no-tta', '--step', '1']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == code, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")]      # no hidden temporary file left
    if signame == "SIGINT":
        assert list(out.iterdir()) == []
    else:  # the writer thread may finish the file it was publishing: then it is whole
        assert sorted(p.name for p in out.iterdir()) in ([], ["k.json", "k.nii.gz"])   # all of the case or none
        if (out / "k.nii.gz").exists():
            import nibabel as nib

            assert nib.load(out / "k.nii.gz").shape == nib.load(CT).shape

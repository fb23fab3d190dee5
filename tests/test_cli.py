"""The command itself: entry points, help, version, exit codes."""

from __future__ import annotations

import subprocess
import sys

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


def test_ctrl_c_exits_130_and_leaves_no_partial_output(small_model_dir, tmp_path):
    """SIGINT during a prediction: exit code 130, one line, no half-written or temporary file."""
    import subprocess
    import sys

    from conftest import CT

    script = (
        "import os, signal, sys, threading\n"
        "from uniseg_cli.cli import main\n"
        "import uniseg_cli.inference.predictor as predictor\n"
        "window = predictor.sliding_window\n"
        "def interrupted(*args, **kwargs):\n"        # Ctrl-C once the network is running, every time
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return window(*args, **kwargs)\n"
        "predictor.sliding_window = interrupted\n"
        f"sys.exit(main(['predict', {str(CT)!r}, '-t', 'kidney', '-m', {str(small_model_dir)!r}, "
        f"'-o', {str(tmp_path / 'k.nii.gz')!r}, '--device', 'cpu']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Error: interrupted" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []

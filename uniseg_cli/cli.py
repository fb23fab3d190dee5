"""The ``uniseg`` command: wires the Typer app, the global options and the subcommands.

Each subcommand lives in ``uniseg_cli/commands/<verb>.py``. ``main()`` turns every ``UnisegError``
into one ``Error: …`` line on standard error and the error's exit code (1 runtime, 2 usage).
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
from collections.abc import Sequence

import typer

from uniseg_cli import __version__
from uniseg_cli.commands import evaluate, export, finetune, predict, preprocess, report, tasks, train, weights
from uniseg_cli.errors import UnisegError
from uniseg_cli.io.stdout import StdoutClosed

HELP = """Prompt-driven universal 3D medical image segmentation (UniSeg).

One network segments liver, kidney, pancreas, spleen, tumours, vertebrae, prostate, brain
tumours and PET lesions; the task prompt says which.

\b
Examples:
  uniseg weights download uniseg-11task   the published weights, once (non-commercial licence)
  uniseg predict scan.nii.gz --task kidney -o kidney.nii.gz
  ls *.nii.gz | uniseg predict - --task liver -o out/ --json
  uniseg predict scan.nii.gz --task kidney -m uniseg-demo --fast   bundled demo model, offline
  uniseg tasks                          list the tasks and their aliases
  uniseg tasks --json                   the same as JSON
  uniseg weights import model_final_checkpoint.model --name my-uniseg
  uniseg preprocess -d kidney=./Dataset001_KiTS -o prep/ && uniseg train prep/ -o my-model/
  uniseg finetune ./Dataset501_Liver -o liver-ft
  uniseg evaluate pred/ labelsTs/ --json > metrics.json
  uniseg export my-model --format onnx
"""

app = typer.Typer(
    name="uniseg",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"uniseg {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debugging detail to stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log only warnings and errors."),
) -> None:
    from uniseg_cli.log import setup_logging

    setup_logging(-1 if quiet else (1 if verbose else 0))


app.command("predict")(predict.predict)
app.command("tasks")(tasks.tasks)
app.command("preprocess")(preprocess.preprocess)
app.command("train")(train.train)
app.command("finetune")(finetune.finetune)
app.command("export")(export.export)
app.command("evaluate")(evaluate.evaluate)
app.command("report")(report.report)
app.add_typer(weights.app, name="weights")


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM (what ``timeout``, Slurm, Kubernetes and systemd send), raised instead of
    KeyboardInterrupt so that it reaches ``main`` (click would turn a KeyboardInterrupt into "Aborted!"
    and exit code 1); a BaseException, so ``except Exception`` blocks let it pass while the atomic writers
    still clean up their temporary files."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code (130 on Ctrl-C, 143 on SIGTERM)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _interrupt) for s in handled} if in_main_thread else {}
    args = list(sys.argv[1:] if argv is None else argv)
    code = 0
    try:
        try:
            app(args=args, prog_name="uniseg")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.stdout.flush()  # here, not at exit: a full disk or a closed pipe is reported like any error
    except UnisegError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        what = "interrupted" if exc.signum == signal.SIGINT else f"stopped by {signal.Signals(exc.signum).name}"
        print(f"Error: {what} ({_resume_hint(args)})", file=sys.stderr)
        return 128 + exc.signum
    except (BrokenPipeError, StdoutClosed):
        _silence_stdout()
        print("Error: standard output was closed by its reader (head, a pager); stopped there", file=sys.stderr)
        return 128 + signal.SIGPIPE
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG) or exc.filename:
            raise
        _silence_stdout()
        print(f"Error: cannot write standard output ({exc.strerror})", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code


def _resume_hint(args: Sequence[str]) -> str:
    """What Ctrl-C leaves and how to go on, for the command that was running."""
    command = next((a for a in args if not a.startswith("-")), "")
    hints = {"predict": "; rerun with --skip-existing to do only the rest",
             "train": "; continue with --resume", "finetune": "; continue with --resume",
             "weights": "; run the same command again: downloads resume where they stopped"}
    return "outputs not finished were removed" + hints.get(command, "")


def _silence_stdout() -> None:
    """Point standard output at /dev/null so that the interpreter's own flush at exit cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (tests capture stdout)
        pass


if __name__ == "__main__":
    sys.exit(main())

"""Writing outputs so that an interrupted or failed run leaves nothing half-written behind."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from uniseg_cli.errors import UnisegError, UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(path: str | Path, *, folder: bool = False) -> None:
    """The permissions any file the user writes gets (0666/0777 less the umask).

    ``mkstemp``/``mkdtemp`` (and safetensors' writer) create private (0600/0700) entries.
    """
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def publish(tmp: str | Path, dest: str | Path, *, folder: bool = False) -> None:
    """Give a finished temporary file or folder the usual permissions and move it into place."""
    usual_permissions(tmp, folder=folder)
    os.replace(tmp, dest)


def remove_leftovers(dest: str | Path) -> None:
    """Remove the hidden temporary siblings of ``dest`` (``.NAME.*.partial*``) that a killed run left.

    Only ``dest``'s own: jobs of a sharded batch write other outputs into the same folder at the same time.
    """
    dest = Path(dest)
    for leftover in dest.parent.glob(f".{glob.escape(dest.name)}.*.partial*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


class AtomicFiles:
    """Temporary siblings of several outputs that appear together or not at all (see ``atomic_files``)."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._publishing: Path | None = None

    def add(self, dest: str | Path, *, suffix: str = "") -> Path:
        """A temporary path to write ``dest`` to; ``suffix`` keeps the ending writers choose their format by.

        Outputs are published in the order they were added: the one that says a case is complete (its
        record) is added last, so that it appears last."""
        dest = Path(dest)
        remove_leftovers(dest)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".partial{suffix}", dir=dest.parent)
        except OSError as exc:
            raise UnisegError(f"{dest}: cannot write here ({exc.strerror or exc})") from None
        os.close(fd)
        self._pending.append((Path(name), dest))
        return Path(name)

    @property
    def pending(self) -> list[tuple[Path, Path]]:
        """(temporary file, destination) of every output added so far, in order."""
        return list(self._pending)

    def _dest_of(self, exc: OSError) -> Path:
        named = {str(tmp): dest for tmp, dest in self._pending}
        return named.get(str(exc.filename), self._publishing or self._pending[-1][1])

    def _publish(self) -> None:
        """Move every output into place in order. A destination that already exists (an earlier run's
        output) is first kept under a hidden backup name (a hard link, or a rename where links are not
        possible); if any move fails, every destination is put back as it was: the new files removed,
        the earlier ones restored whole. The backups go only once all moves succeeded."""
        done: list[tuple[Path, Path | None]] = []   # (destination, backup of what it replaced)
        try:
            for tmp, dest in self._pending:
                self._publishing = dest
                backup = _backup(dest)
                done.append((dest, backup))
                publish(tmp, dest)
        except BaseException:
            for dest, backup in reversed(done):
                if backup is None:
                    dest.unlink(missing_ok=True)
                elif dest.exists() and os.path.samefile(dest, backup):
                    backup.unlink()                # never replaced (rename() of two links is a no-op)
                else:
                    os.replace(backup, dest)
            raise
        for _, backup in done:
            if backup is not None:
                backup.unlink(missing_ok=True)

    def _discard(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)


def _backup(dest: Path) -> Path | None:
    """A hidden second name for an existing file ``dest`` (None if there is none), so that a failed
    publish can put it back; ``remove_leftovers`` clears it if the process is killed meanwhile."""
    if not dest.is_file() or dest.is_symlink():
        return None
    backup = dest.with_name(f".{dest.name}.{os.getpid()}.partial.old")
    backup.unlink(missing_ok=True)
    try:
        os.link(dest, backup)
    except OSError:               # no hard links here (some network and FAT file systems)
        os.replace(dest, backup)
    return backup


@contextlib.contextmanager
def atomic_files() -> Iterator[AtomicFiles]:
    """Outputs of one unit of work (a case's label map, probabilities, sidecars): written to temporary
    names and moved into place together when the block succeeds; on any failure none of them is left."""
    outputs = AtomicFiles()
    try:
        yield outputs
        outputs._publish()
    except OSError as exc:  # full disk, quota: name the output, not the temporary file
        outputs._discard()
        if not outputs._pending:
            raise
        raise UnisegError(f"{outputs._dest_of(exc)}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        outputs._discard()
        raise


@contextlib.contextmanager
def atomic_file(dest: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling path to write; it becomes ``dest`` only if the block succeeds.

    ``suffix`` keeps the ending that writers choose their format by (``.nii.gz``, ``.npz``).
    """
    with atomic_files() as outputs:
        yield outputs.add(dest, suffix=suffix)


def refuse_replacing_inputs(dest: str | Path, inputs: Sequence[str | Path | None]) -> None:
    """A usage error if replacing the folder ``dest`` (``--force``) would delete one of ``inputs``:
    checked before any work, since an input of the user's is never deleted."""
    folder = Path(dest).resolve()
    for given in inputs:
        if given is not None and (Path(given).resolve() == folder or folder in Path(given).resolve().parents):
            raise UsageError(f"{dest}: holds the input {given}; write the output folder elsewhere")


def make_folder(folder: str | Path) -> None:
    """Create an output folder and its parents, or refuse in one line naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UnisegError(f"{folder}: exists and is not a folder") from None
    except OSError as exc:
        raise UnisegError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None


def write_text(dest: str | Path, text: str) -> None:
    """``dest.write_text(text)`` (UTF-8), atomically."""
    with atomic_file(dest, suffix=Path(dest).suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")


#: The list of what uniseg wrote into a folder (``atomic_directory``), so that ``--force`` replaces
#: only a folder holding nothing else.
FOLDER_MANIFEST = ".uniseg-written.json"


def foreign_entries(folder: Path, ours: Sequence[str] = ()) -> list[str]:
    """The entries of ``folder`` that uniseg did not write there: neither listed in its manifest nor
    among ``ours`` (the names the caller always writes, for folders made before manifests existed)."""
    import json

    try:
        listed = set(json.loads((folder / FOLDER_MANIFEST).read_text(encoding="utf-8")).get("files", []))
    except (OSError, ValueError, AttributeError):
        listed = set()
    return sorted(e.name for e in folder.iterdir()
                  if e.name != FOLDER_MANIFEST and e.name not in listed and e.name not in ours
                  and not (e.name.startswith(".") and ".partial" in e.name))


@contextlib.contextmanager
def atomic_directory(dest: str | Path, *, overwrite: bool = False, ours: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes ``dest`` only if the block succeeds.

    The new folder gets a manifest (``FOLDER_MANIFEST``) of what was written. An existing non-empty
    ``dest`` is replaced only with ``overwrite`` and only if it holds nothing but what uniseg wrote there
    (its manifest, or ``ours``): ``--force`` never deletes a user's file. The old folder goes only after
    the new one is complete.
    """
    import json

    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UnisegError(f"{dest}: exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        foreign = foreign_entries(dest, ours)
        if foreign:
            more = f" and {len(foreign) - 1} other(s)" if len(foreign) > 1 else ""
            raise UnisegError(f"{dest}: holds {foreign[0]}{more}, which uniseg did not write there; give a new or "
                              "empty folder (--force replaces only a folder uniseg wrote)")
        if not overwrite:
            raise UnisegError(f"{dest}: holds an earlier output of uniseg (use --force to replace it)")
    parent = dest.parent
    make_folder(parent)
    remove_leftovers(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise UnisegError(f"{dest}: cannot create the output folder ({exc.strerror or exc})") from None
    old = None
    try:
        yield tmp
        names = sorted(e.name for e in tmp.iterdir() if e.name != FOLDER_MANIFEST)
        (tmp / FOLDER_MANIFEST).write_text(json.dumps({"files": names}, indent=1) + "\n", encoding="utf-8")
        usual_permissions(tmp / FOLDER_MANIFEST)
        if dest.exists():
            old = parent / f".{dest.name}.{os.getpid()}.old"
            dest.rename(old)
        publish(tmp, dest, folder=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():  # the new folder never arrived: put the old one back
            old.rename(dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""Reading scans into ``(channels, z, y, x)`` arrays and writing label maps with the input's exact geometry.

Readers are chosen from a plain list by file ending. NIfTI goes through nibabel so that the written
label map keeps the input's affine, qform/sform codes and header; NRRD, MetaImage and DICOM series
go through SimpleITK. Arrays are in SimpleITK's order (z, y, x) either way, spacing likewise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_cli.errors import UnisegError, first_line
from uniseg_cli.io.atomic import AtomicFiles, atomic_files

log = logging.getLogger(__name__)

NIFTI_ENDINGS = (".nii.gz", ".nii")
SITK_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_ENDINGS = NIFTI_ENDINGS + SITK_ENDINGS


class ImageError(UnisegError):
    """A scan that cannot be read or does not fit (one line naming the file)."""


def image_ending(path: str | Path) -> str | None:
    name = str(path).lower()
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), None)


def strip_ending(path: str | Path) -> str:
    name = Path(path).name
    ending = image_ending(name)
    return name[: -len(ending)] if ending else name


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a scan lie; the writer takes it back unchanged.

    ``shape`` and ``spacing`` are in array order (z, y, x). ``origin``/``direction`` are in
    SimpleITK's LPS convention (direction row-major, columns = index axes i, j, k); for NIfTI inputs
    the original ``affine`` and ``header`` are kept as well so that NIfTI outputs copy them exactly.
    """

    source: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    affine: Any = None
    header: Any = None
    dicom_files: tuple[str, ...] = ()  # a DICOM series' slice files, in the order of array axis 0
    modality: str = ""                 # a DICOM series' Modality (CT, MR, PT, …); '' for other files
    modalities: tuple[str, ...] = ()   # per channel of a case (``read_channels``): each file's ``modality``

    def same_grid(self, other: Geometry) -> bool:
        return (self.shape == other.shape and np.allclose(self.spacing, other.spacing, rtol=1e-4, atol=1e-5)
                and np.allclose(self.origin, other.origin, atol=1e-3)
                and np.allclose(self.direction, other.direction, atol=1e-4))

    def difference(self, other: Geometry, other_name: str) -> str:
        """What differs from ``other``'s grid, as "is …, not … like NAME" (grids that differ only in
        origin or orientation would otherwise be described with identical words)."""
        if self.shape != other.shape or not np.allclose(self.spacing, other.spacing, rtol=1e-4, atol=1e-5):
            return f"is {self.describe()}, not {other.describe()} like {other_name}"
        if not np.allclose(self.origin, other.origin, atol=1e-3):
            return (f"has its origin at {_point(self.origin)} mm, not {_point(other.origin)} mm like {other_name} "
                    f"(both {self.describe()})")
        return (f"has the orientation {_axes(self.direction)}, not {_axes(other.direction)} like {other_name} "
                f"(both {self.describe()}, same origin)")

    def describe(self) -> str:
        shape = "×".join(map(str, self.shape[::-1]))
        spacing = "×".join(f"{s:g}" for s in self.spacing[::-1])
        return f"{shape} voxels at {spacing} mm"

    def array_axis_world(self) -> tuple[int, int, int]:
        """For array axes (z, y, x) of the scan, the world axis each runs along most (0 = L-R, 1 = A-P, 2 = S-I)."""
        d = np.asarray(self.direction).reshape(3, 3)
        # array axis 0 is index axis k (column 2), array axis 2 is index axis i (column 0)
        return tuple(int(np.argmax(np.abs(d[:, 2 - a]))) for a in range(3))  # type: ignore[return-value]


def _point(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _axes(direction: Sequence[float]) -> str:
    """Direction cosines as the columns of the matrix (index axes i, j, k), LPS."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    return " ".join(f"{axis}={_point(d[:, c])}" for c, axis in enumerate("ijk"))


def read_image(path: str | Path, *, nan_to_zero: bool = True,
               allow_gaps: bool = False) -> tuple[np.ndarray, Geometry]:
    """One scan file or DICOM series folder as a float32 ``(channels, z, y, x)`` array and its geometry.

    NaN and ±Inf become 0 (docs/pipeline.md §3) unless ``nan_to_zero`` is off (the training-data check refuses NaN).
    A DICOM series with missing slices, uneven spacing or mixed orientations is refused unless
    ``allow_gaps`` (then read on ITK's evenly spaced grid, with a warning).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    _quiet_itk()
    try:
        if path.is_dir():
            data, geometry = _read_dicom_series(path, allow_gaps=allow_gaps)
        elif image_ending(path) in NIFTI_ENDINGS:
            data, geometry = _read_nifti(path)
        elif image_ending(path) in SITK_ENDINGS:
            data, geometry = _read_sitk(path)
        else:
            raise ImageError(f"{path}: unsupported file type (use {', '.join(IMAGE_ENDINGS)} or a DICOM folder)")
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{path}: not enough memory to read the image") from None
    except Exception as exc:  # every reader fails its own way on corrupt files
        raise ImageError(f"{path}: cannot read the image ({_reason(exc)})") from None
    check_geometry(path, geometry)
    if nan_to_zero:
        bad = ~np.isfinite(data)
        if bad.any():
            nan = int(np.isnan(data).sum())
            what = " and ".join(w for w, n in (("NaN", nan), ("infinite", int(bad.sum()) - nan)) if n)
            log.warning("%s: %.2g%% of the voxels are %s; they are read as 0", path, 100 * bad.mean(), what)
            data[bad] = 0.0
    return data, geometry


def _reason(exc: BaseException) -> str:
    """The line of a reader's error that says what is wrong: ITK's first line is its source location,
    NRRD's reason is the last of its ``[nrrd]`` lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    nrrd = [line.split(":", 1)[-1].strip() for line in lines if line.startswith("[nrrd]")]
    if nrrd:
        return nrrd[-1]
    useful = [line for line in lines if not line.startswith("Exception thrown in SimpleITK")]
    if useful:
        text = useful[0]
        return text.split("): ", 1)[-1] if text.startswith(("ITK ERROR", "itk::ERROR")) else text
    return first_line(exc)


#: gzip cannot shrink data by more than about 1032:1, so a compressed file this many times smaller than
#: its header's voxel count cannot hold them (a broken header, or a truncated file).
GZIP_MAX_RATIO = 1032


def _check_sizes(path: Path, needed: int, available: int, shape: Sequence[int], *, compressed: bool) -> None:
    """Refuse a file whose header promises more voxel bytes than it can hold, before allocating them."""
    if (needed > available * GZIP_MAX_RATIO) if compressed else (needed > available):
        shown = "×".join(str(int(s)) for s in shape)
        holds = (f"its {_bytes(max(available, 0))} of compressed data cannot hold them" if compressed
                 else f"the file holds {_bytes(max(available, 0))} of voxel data")
        raise ImageError(f"{path}: its header claims {shown} voxels ({_bytes(needed)}) but {holds} "
                         "(truncated, or a broken header)")


def _bytes(count: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"


def _check_metaimage(path: Path) -> None:
    """MetaImage (.mha/.mhd): the voxel data file must exist and be as long as the header says; ITK
    would otherwise report only its own source location."""
    header: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as handle:
        for raw in handle:
            offset += len(raw)
            key, _, value = raw.decode("latin-1").partition("=")
            header[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    data_file = header.get("ElementDataFile", "")
    if not data_file:
        raise ImageError(f"{path}: not a MetaImage header (no ElementDataFile line)")
    types = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
             "MET_FLOAT": 4, "MET_DOUBLE": 8, "MET_ULONG": 8, "MET_LONG": 8}
    try:
        shape = [int(v) for v in header.get("DimSize", "").split()]
        size = types[header.get("ElementType", "")] * int(header.get("ElementNumberOfChannels", "1") or 1)
    except (KeyError, ValueError):
        return  # ITK's own reading says what is wrong
    if data_file.upper() == "LOCAL":
        available = path.stat().st_size - offset
    elif data_file.upper() == "LIST" or "%" in data_file:
        return
    else:
        target = path.parent / data_file
        if not target.is_file():
            raise ImageError(f"{path}: its voxel data file {data_file} (ElementDataFile) is missing")
        available = target.stat().st_size
    compressed = header.get("CompressedData", "False").lower() == "true"
    _check_sizes(path, int(np.prod(shape)) * size, available, shape, compressed=compressed)


SPACING_RANGE_MM = (0.01, 100.0)  # voxel sizes outside this are broken headers, not scans


def check_geometry(path: Path, geometry: Geometry) -> None:
    """Refuse a header no scanner writes (before it turns into a crash or a plausible wrong map):
    voxel sizes outside 0.01–100 mm or not finite, a non-finite or singular orientation or origin."""
    low, high = SPACING_RANGE_MM
    spacing = np.asarray(geometry.spacing, dtype=float)
    if not np.isfinite(spacing).all() or (spacing < low).any() or (spacing > high).any():
        shown = " × ".join(f"{s:g}" for s in spacing[::-1])
        raise ImageError(f"{path}: voxel size {shown} mm is outside {low:g}–{high:g} mm (a broken header?)")
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    matrices = [direction] + ([np.asarray(geometry.affine, dtype=float)] if geometry.affine is not None else [])
    if not all(np.isfinite(m).all() for m in matrices) or not np.isfinite(geometry.origin).all():
        raise ImageError(f"{path}: its orientation or origin holds NaN or infinite values (a broken header?)")
    if abs(np.linalg.det(direction)) < 1e-6:
        raise ImageError(f"{path}: its orientation matrix is singular (axes do not span 3-D space)")


def read_channels(paths: Sequence[str | Path], *, nan_to_zero: bool = True,
                  allow_gaps: bool = False) -> tuple[np.ndarray, Geometry]:
    """The channels of one case, checked to share one grid; a 4-D NIfTI counts as its channels."""
    arrays, geometries = [], []
    for path in paths:
        data, geometry = read_image(path, nan_to_zero=nan_to_zero, allow_gaps=allow_gaps)
        if geometries and not geometry.same_grid(geometries[0]):
            raise ImageError(f"channels are on different grids: {path} {geometry.difference(geometries[0], str(paths[0]))}")
        arrays.append(data)
        geometries.append(geometry)
    modalities = tuple(g.modality for g, a in zip(geometries, arrays) for _ in range(a.shape[0]))
    return ((arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)),
            replace(geometries[0], modalities=modalities))


def _check_3d(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) < 3 or sum(s > 1 for s in shape[:3]) < 3:
        raise ImageError(f"{path}: is a {len([s for s in shape if s > 1])}-D image (shape {shape}); "
                         "uniseg segments 3-D volumes")


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    import nibabel as nib

    image = nib.load(str(path))
    shape = image.shape
    _check_3d(path, shape)
    dtype = image.get_data_dtype()
    if dtype.fields is not None or dtype.kind in "Vc":
        what = "RGB colour" if dtype.fields is not None else ("complex" if dtype.kind == "c" else "structured")
        raise ImageError(f"{path}: holds {what} voxels ({dtype}); uniseg segments grey-value scans")
    offset = int(image.header["vox_offset"]) if path.name.lower().endswith(".nii") else 0
    _check_sizes(path, int(np.prod(shape)) * dtype.itemsize, path.stat().st_size - offset, shape,
                 compressed=path.name.lower().endswith(".gz"))
    if len(shape) > 4 or (len(shape) == 4 and shape[3] < 1):
        raise ImageError(f"{path}: has shape {shape}; expected a 3-D volume or a 4-D stack of channels")
    data = np.asarray(image.dataobj, dtype=np.float32)
    data = data[..., None] if data.ndim == 3 else data
    data = np.ascontiguousarray(data.transpose(3, 2, 1, 0))  # (i, j, k, c) -> (c, z, y, x)
    affine = image.affine
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    spanned = np.linalg.norm(affine[:3, :3], axis=0)
    if np.isfinite(affine).all() and not np.allclose(spanned, zooms, rtol=1e-3, atol=1e-4):
        # nibabel turns a zero pixdim into 1 mm on load; the affine still says what the scanner wrote
        raise ImageError(f"{path}: the header's voxel size {' × '.join(f'{z:g}' for z in zooms)} mm disagrees with "
                         f"its affine's {' × '.join(f'{z:.4g}' for z in spanned)} mm (a broken header?)")
    ras = affine[:3, :3] / np.where(zooms > 0, zooms, 1.0)
    lps = np.diag([-1.0, -1.0, 1.0])
    geometry = Geometry(
        source=str(path),
        shape=tuple(int(s) for s in data.shape[1:]),  # type: ignore[arg-type]
        spacing=tuple(float(z) for z in zooms[::-1]),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in lps @ affine[:3, 3]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in (lps @ ras).ravel()),
        affine=affine.copy(),
        header=image.header.copy(),
    )
    return data, geometry


def _sitk_geometry(path: Path, image: Any) -> Geometry:
    return Geometry(
        source=str(path),
        shape=tuple(int(s) for s in image.GetSize()[::-1]),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in image.GetSpacing()[::-1]),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in image.GetDirection()),
    )


def _sitk_array(path: Path, image: Any) -> np.ndarray:
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise ImageError(f"{path}: is a {image.GetDimension()}-D image; uniseg segments 3-D volumes")
    _check_3d(path, tuple(image.GetSize()))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "give each channel as its own file")
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)[None]


def _quiet_itk() -> None:
    """ITK prints warnings straight to the terminal, past ``-q`` and our one-line errors; the readers
    check what those warnings are about themselves (uneven DICOM slices above all)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def _read_sitk(path: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    if image_ending(path) in (".mha", ".mhd"):
        _check_metaimage(path)
    image = sitk.ReadImage(str(path))
    return _sitk_array(path, image), _sitk_geometry(path, image)


#: Objects that share a series folder with the images but are not slices of a scan: segmentations,
#: structure sets, reports, presentation states, registrations (by Modality, then SOP Class UID).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "RWV"})
NON_IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",   # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",   # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.66.1",   # Spatial Registration
})
_MODALITY, _SOP_CLASS, _ROWS, _COLUMNS = "0008|0060", "0008|0016", "0028|0010", "0028|0011"


def _header_tags(file: str, *tags: str) -> list[str]:
    """Tag values of one DICOM file's header ('' where absent), without its pixels."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    return [reader.GetMetaData(t).strip() if reader.HasMetaDataKey(t) else "" for t in tags]


def _image_series(path: Path) -> tuple[str, list[str]]:
    """The one image series of a folder (id, files), ignoring non-image objects (our own SEG beside the
    slices, say) with one line; a folder with several image series is refused."""
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise ImageError(f"{path}: folder holds no DICOM series")
    images, ignored = [], []
    for uid in series:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid))
        modality, sop_class = _header_tags(files[0], _MODALITY, _SOP_CLASS)
        if modality.upper() in NON_IMAGE_MODALITIES or sop_class in NON_IMAGE_SOP_CLASSES:
            ignored.append(f"{modality or sop_class} {Path(files[0]).name}")
        else:
            images.append((uid, files))
    if ignored:
        log.info("%s: ignoring %d DICOM object(s) that are not image slices: %s", path, len(ignored), ", ".join(ignored))
    if not images:
        raise ImageError(f"{path}: folder holds no DICOM image series (only {', '.join(ignored)})")
    if len(images) > 1:
        sizes = ", ".join(f"{len(files)} file(s) like {Path(files[0]).name}" for _, files in images)
        raise ImageError(f"{path}: folder holds {len(images)} DICOM image series ({sizes}); give one series per folder")
    return images[0]


def _odd_slice(path: Path, files: Sequence[str]) -> str | None:
    """The slice whose size differs from the others', as one line (ITK reports only its source location)."""
    sizes = [tuple(_header_tags(f, _COLUMNS, _ROWS)) for f in files]
    common = max(set(sizes), key=sizes.count)
    odd = next((i for i, size in enumerate(sizes) if size != common), None)
    if odd is None:
        return None
    return (f"{files[odd]}: is {'×'.join(sizes[odd])} pixels, the other slices of the series {path} are "
            f"{'×'.join(common)}")


def _read_dicom_series(path: Path, *, allow_gaps: bool) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    _, files = _image_series(path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position and orientation, read in the same pass
    try:
        image = reader.Execute()
    except RuntimeError:
        odd = _odd_slice(path, files)
        if odd is not None:
            raise ImageError(odd) from None
        raise

    def tag(i: int, key: str) -> str:
        return reader.GetMetaData(i, key).strip() if reader.HasMetaDataKey(i, key) else ""

    modalities = [tag(i, _MODALITY).upper() for i in range(len(files))]
    kinds = {m: modalities.count(m) for m in dict.fromkeys(modalities)}
    if len(kinds) > 1:
        rare = min(kinds, key=kinds.__getitem__)
        counts = ", ".join(f"{n} {m or 'no-modality'}" for m, n in kinds.items())
        raise ImageError(f"{path}: slices of different modalities in one series ({counts} slices; e.g. "
                         f"{Path(files[modalities.index(rare)]).name} is {rare or 'without a modality'}); "
                         "give one scan per folder")
    slices = [(files[i], tag(i, _POSITION), tag(i, _ORIENTATION)) for i in range(len(files))]
    problem = series_problem(slices)
    if problem is not None:
        stacked = set(files)
        others = [f for f in path.iterdir() if f.is_file() and not f.name.startswith(".") and str(f) not in stacked]
        if others:
            problem += f" ({len(others)} other file(s) in the folder, e.g. {others[0].name}, are not readable as this series)"
        if not allow_gaps:
            raise ImageError(f"{path}: {problem}; pass --allow-gaps to segment it on an evenly spaced grid anyway")
        log.warning("%s: %s; segmenting it anyway (--allow-gaps) on an evenly spaced grid of %g mm", path, problem,
                    image.GetSpacing()[2])
    return _sitk_array(path, image), replace(_sitk_geometry(path, image), dicom_files=tuple(files),
                                             modality=modalities[0] if modalities else "")


_POSITION, _ORIENTATION = "0020|0032", "0020|0037"  # Image Position / Orientation (Patient)
#: Slice positions may differ from even spacing by this share of the spacing, plus what writing positions
#: to two decimals does (each position off by up to 0.005 mm, so a step by up to 0.01 mm: a 0.625 mm
#: series stored as 0.62/0.63 mm steps is even).
SLICE_SPACING_TOLERANCE = 0.01
POSITION_ROUNDING_MM = 0.011


def series_problem(slices: Sequence[tuple[str, str, str]]) -> str | None:
    """Why a DICOM series is not a regular 3-D grid, or None: ``slices`` are (file, Image Position
    (Patient), Image Orientation (Patient)) in the reader's order.

    ITK stacks slices at their mean distance whatever the gaps (with a warning on the terminal): a
    missing slice would shift every label beyond it, so the gap is named here instead.
    """
    if len(slices) < 2:
        return None
    try:
        positions = np.array([[float(v) for v in p.split("\\")] for _, p, _ in slices])
        orientations = np.array([[float(v) for v in o.split("\\")] for _, _, o in slices])
    except ValueError:
        return "slices without a readable Image Position or Orientation (Patient)"
    if positions.shape[1:] != (3,) or orientations.shape[1:] != (6,):
        return "slices without a readable Image Position or Orientation (Patient)"
    names = [Path(f).name for f, _, _ in slices]
    mixed = np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > 1e-4)
    if mixed.size:
        return f"mixed slice orientations ({names[0]} and {names[mixed[0]]} differ)"
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along = positions @ normal
    order = np.argsort(along)
    along, positions = along[order], positions[order]
    names = [names[i] for i in order]
    steps = np.diff(along)
    step = float(np.median(steps))
    if step < 1e-3:
        return f"{len(slices) - len(set(np.round(along, 3)))} slice(s) at duplicate positions"
    duplicate = np.flatnonzero(steps < 1e-3)
    if duplicate.size:
        i = duplicate[0]
        return f"two slices at the same position {along[i]:g} mm ({names[i]}, {names[i + 1]})"
    uneven = np.flatnonzero(np.abs(steps - step) > SLICE_SPACING_TOLERANCE * step + POSITION_ROUNDING_MM)
    if uneven.size:
        i = uneven[0]
        ratio = steps[i] / step
        whole = abs(ratio - round(ratio)) < 0.1 and round(ratio) >= 2  # a multiple of the spacing: slices lost
        what = f"{round(ratio) - 1} slice(s) missing" if whole else "uneven slice spacing"
        more = f", and {uneven.size - 1} more uneven step(s)" if uneven.size > 1 else ""
        return (f"{what}: {steps[i]:g} mm between slice positions {along[i]:g} and {along[i + 1]:g} mm along the "
                f"slice normal ({names[i]}, {names[i + 1]}), the others are {step:g} mm apart{more}")
    offsets = positions - positions[0]
    sideways = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if sideways.max() > SLICE_SPACING_TOLERANCE * step + POSITION_ROUNDING_MM:
        return (f"slices shifted within their plane by up to {sideways.max():.3g} mm (a tilted gantry?): "
                "they do not stack into a grid")
    return None


def is_dicom_folder(path: Path) -> bool:
    import SimpleITK as sitk

    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def write_array(path: str | Path, array: np.ndarray, geometry: Geometry, *, into: AtomicFiles | None = None,
                description: str | None = None) -> None:
    """Write a ``(z, y, x)`` or ``(c, z, y, x)`` array on the geometry it was read with, atomically
    (or as one of the outputs ``into`` publishes together); see ``write_image_file``."""
    if into is None:
        with atomic_files() as outputs:
            return write_array(path, array, geometry, into=outputs, description=description)
    write_image_file(into.add(path, suffix=image_ending(path) or ".nii.gz"), array, geometry, description=description)


def write_image_file(path: str | Path, array: np.ndarray, geometry: Geometry, *,
                     description: str | None = None) -> None:
    """Write an array to ``path`` (its ending picks the format; callers pass a temporary name).

    NIfTI to NIfTI keeps the input's affine, qform/sform codes and header fields (with the new
    dtype); every other combination writes origin, spacing and direction through SimpleITK.
    ``description`` goes into the NIfTI ``descrip`` field or the ITK metadata (``uniseg``), which is
    how a later run tells uniseg's outputs from scans.
    """
    path = Path(path)
    if image_ending(path) in NIFTI_ENDINGS and geometry.header is not None:
        _write_nifti(path, array, geometry, description)
    else:
        _write_sitk(path, array, geometry, description)


#: The ITK metadata key ``write_image_file`` stores ``description`` under.
DESCRIPTION_KEY = "uniseg"


def image_description(path: str | Path) -> str:
    """What ``write_image_file`` recorded as the file's description ('' if none or unreadable): the
    header only, no voxels."""
    path = Path(path)
    try:
        if image_ending(path) in NIFTI_ENDINGS:
            import nibabel as nib

            raw = nib.load(str(path)).header["descrip"]
            return bytes(np.asarray(raw).tobytes()).split(b"\0", 1)[0].decode("latin-1").strip()
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader.GetMetaData(DESCRIPTION_KEY).strip() if reader.HasMetaDataKey(DESCRIPTION_KEY) else ""
    except Exception:  # noqa: BLE001 - an unreadable file is not ours; reading it later says what is wrong
        return ""


def _write_nifti(path: Path, array: np.ndarray, geometry: Geometry, description: str | None = None) -> None:
    import nibabel as nib

    header = geometry.header.copy()
    data = array.transpose(2, 1, 0) if array.ndim == 3 else array.transpose(3, 2, 1, 0)
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(np.ascontiguousarray(data), geometry.affine, header)
    image.set_qform(geometry.header.get_qform(), code=int(geometry.header["qform_code"]))
    image.set_sform(geometry.header.get_sform(), code=int(geometry.header["sform_code"]))
    image.header.set_slope_inter(1.0, 0.0)
    if description is not None:
        image.header["descrip"] = description.encode("latin-1")[:79]
    nib.save(image, str(path))


def _write_sitk(path: Path, array: np.ndarray, geometry: Geometry, description: str | None = None) -> None:
    import SimpleITK as sitk

    if array.ndim == 4:  # channels as vector components
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(array, 0, -1)), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing[::-1])
    image.SetDirection(geometry.direction)
    if description is not None:
        image.SetMetaData(DESCRIPTION_KEY, description)
    sitk.WriteImage(image, str(path), useCompression=True)
    if description is not None and image_ending(path) in NIFTI_ENDINGS:
        _set_nifti_descrip(path, description)   # ITK's NIfTI writer drops the metadata


def _set_nifti_descrip(path: Path, description: str) -> None:
    """Write ``description`` into a NIfTI-1 file's ``descrip`` field (80 bytes at offset 148), nothing else."""
    import gzip

    packed = path.name.lower().endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if packed else path.read_bytes())
    data[148:228] = description.encode("latin-1")[:79].ljust(80, b"\0")
    path.write_bytes(gzip.compress(bytes(data), compresslevel=6, mtime=0) if packed else bytes(data))

"""A PNG to check a segmentation at a glance: axial, coronal and sagittal slices through the labelled
region, the labels blended in their colours over the scan, a legend, at the scan's physical aspect.

Slices are shown in the radiological convention whatever the file's storage order: the scan is first
permuted and flipped to (superior→inferior, anterior→posterior, right→left), so that the patient's
right is on the image's left and superior at the top.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_cli.io.images import Geometry

OPACITY = 0.5
CT_WINDOW_HU = (-160.0, 240.0)  # soft tissue; the abdominal tasks' structures read best in it
PANELS = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class PreviewLayout:
    """Where the slice centre lies in the written PNG, per panel: (row, column) pixel."""

    centre: dict[str, tuple[int, int]]
    size: tuple[int, int]  # (height, width)


def radiological(volume: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``volume`` (z, y, x) as (S→I, A→P, R→L) and its spacing in that order."""
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    # the world axis each array axis runs along most, one each (0 L-R (+L), 1 A-P (+P), 2 S-I (+S)): the
    # assignment with the largest summed cosines, so that an oblique scan (axes at 45°) is still shown
    columns = [direction[:, 2 - axis] for axis in range(3)]   # array axis 0 is index axis k (column 2)
    worlds = max(itertools.permutations(range(3)),
                 key=lambda w: sum(abs(columns[axis][w[axis]]) for axis in range(3)))
    order, flips = [0, 0, 0], []
    for axis in range(3):
        column, world = columns[axis], worlds[axis]
        order[2 - world] = axis
        increasing = column[world] > 0
        if (world == 2 and increasing) or (world != 2 and not increasing):
            flips.append(axis)                         # S at row 0; P and L towards higher indices
    flipped = np.flip(volume, axis=tuple(flips)) if flips else volume
    spacing = tuple(float(geometry.spacing[a]) for a in order)
    return np.transpose(flipped, order), spacing       # type: ignore[return-value]


def gray_window(intensity: np.ndarray, *, is_ct: bool) -> tuple[float, float]:
    """The intensities shown black and white: a soft-tissue window for CT, else the 1st and 99th
    percentile of the non-zero voxels (of every 8th voxel: a window, not a statistic)."""
    if is_ct:
        return CT_WINDOW_HU
    values = intensity.ravel()[::8]
    values = values[values != 0]
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return float(low), float(high)


def display_gray(intensity: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Intensities as 0–1 gray in ``window``."""
    low, high = window
    return np.clip((intensity.astype(np.float32) - low) / max(high - low, 1e-6), 0, 1)


def blend(gray: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """RGB 0–1: gray, with each label's colour mixed in at ``OPACITY``."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for value, colour in colours.items():
        hit = labels == value
        rgb[hit] = (1 - OPACITY) * rgb[hit] + OPACITY * np.asarray(colour, dtype=np.float32) / 255
    return rgb


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The labelled voxel nearest the centroid of all labelled voxels (so every panel cuts a label);
    the volume's centre when nothing is labelled."""
    points = np.argwhere(labels > 0)
    if not len(points):
        return tuple(s // 2 for s in labels.shape)     # type: ignore[return-value]
    if len(points) > 200_000:
        points = points[:: len(points) // 200_000 + 1]
    centroid = points.mean(axis=0)
    return tuple(int(v) for v in points[np.argmin(((points - centroid) ** 2).sum(axis=1))])  # type: ignore[return-value]


def write_preview(path: Path, intensity: np.ndarray, labels: np.ndarray, legend: Sequence[Any], geometry: Geometry,
                  *, title: str, is_ct: bool) -> PreviewLayout:
    """Three panels through the labelled region and a legend of the labels present, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image, spacing = radiological(intensity, geometry)     # views: nothing is copied until sliced
    canon, _ = radiological(labels, geometry)
    centre = _centre(canon)
    colours = {label.value: label.terms.colour for label in legend}
    window = gray_window(intensity, is_ct=is_ct)
    planes = {"axial": (np.s_[centre[0]], spacing[1], spacing[2], (centre[1], centre[2])),
              "coronal": (np.s_[:, centre[1]], spacing[0], spacing[2], (centre[0], centre[2])),
              "sagittal": (np.s_[:, :, centre[2]], spacing[0], spacing[1], (centre[0], centre[1]))}
    cuts = {name: (blend(display_gray(image[where], window), canon[where], colours), sy, sx, point)
            for name, (where, sy, sx, point) in planes.items()}
    widths = [cut.shape[1] * sx for cut, _, sx, _ in cuts.values()]
    heights = [cut.shape[0] * sy for cut, sy, _, _ in cuts.values()]
    scale = 4.0 / max(heights)                         # inches per mm: panels 4 inches high at most
    dpi, margin, legend_height, title_height = 100, 0.15, 0.8, 0.5
    fig_width = sum(w * scale for w in widths) + margin * 4
    fig_height = max(heights) * scale + legend_height + title_height + margin
    figure = Figure(figsize=(fig_width, fig_height), dpi=dpi, facecolor="black")
    left = margin
    axes = {}
    for (name, (cut, sy, sx, _)), width, height in zip(cuts.items(), widths, heights):
        ax = figure.add_axes((left / fig_width, (legend_height + margin) / fig_height,
                              width * scale / fig_width, height * scale / fig_height))
        ax.imshow(cut, extent=(0, width, height, 0), interpolation="nearest", aspect="equal")
        ax.set_axis_off()
        ax.set_title(name, color="white", fontsize=9, pad=2)
        axes[name] = ax
        left += width * scale + margin
    present = set(np.unique(labels).tolist())
    handles = [Patch(facecolor=np.asarray(label.terms.colour) / 255, label=f"{label.value} {label.name}")
               for label in legend if label.value in present]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False,
                      labelcolor="white", fontsize=8)
    figure.suptitle(title, color="white", fontsize=9, y=0.995)
    figure.canvas.draw()
    height_px = int(round(fig_height * dpi))
    where = {}
    for name, (cut, sy, sx, (row, col)) in cuts.items():
        x, y = axes[name].transData.transform(((col + 0.5) * sx, (row + 0.5) * sy))
        where[name] = (int(height_px - y), int(x))
    figure.savefig(str(path), format="png", dpi=dpi, facecolor="black")
    return PreviewLayout(where, (height_px, int(round(fig_width * dpi))))

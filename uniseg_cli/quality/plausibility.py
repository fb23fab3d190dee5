"""Is this scan the kind of image its task expects? Checked before any network pass.

A network given the wrong kind of image still answers, with confident labels: a brain MR gets a
"liver", a CT stored without its rescale intercept (+1024) a spleen of a seventh of its size. These
checks look at each channel's value distribution (on at most ``SAMPLE_VOXELS`` voxels, evenly strided,
so a 500-slice CT costs well under a second) and at the DICOM Modality tag, and refuse, in one line
with the evidence, what cannot be the declared modality:

- **CT** must be in Hounsfield units: air (at most ``AIR_HU``) in at least ``AIR_SHARE`` of the
  voxels, and soft tissue (``SOFT_TISSUE_HU``) in at least ``SOFT_TISSUE_SHARE``, both among the voxels
  that are not the scanner's padding (below ``PADDING_HU``); values within 0-1
  or 0-255 are named as rescaled images, one without air whose median lies in soft tissue + 1024 as a
  missing rescale intercept;
- **MR and PET** must not look like a CT: at most ``CT_LIKE_SHARE`` of the voxels below
  ``CT_LIKE_HU`` (MR and PET values are non-negative or z-scored, never -500);
- **every channel** must vary: a channel whose 0.5th and 99.5th percentiles are equal (at least 99%
  of the voxels hold one value) is refused;
- **two channels of one case** must not be the same file or the same voxels;
- **DICOM series** must carry the modality the channel declares (CT, MR, PT for PET).

The thresholds sit far from every real scan of the project's data and every bad variant of it; the
table that shows it is in docs/quality.md. ``--accept-implausible`` segments such a scan knowingly:
each finding is logged as a warning and recorded in the case record (quality flag ``input_override``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uniseg_cli.errors import ImplausibleInputError
from uniseg_cli.tasks import Channel

log = logging.getLogger(__name__)

SAMPLE_VOXELS = 1 << 21
AIR_HU = -800.0
AIR_SHARE = 0.01
SOFT_TISSUE_HU = (-150.0, 250.0)
SOFT_TISSUE_SHARE = 0.05
CT_LIKE_HU = -500.0
#: Below this a CT value is the scanner's padding outside the field of view (air is -1000 HU).
PADDING_HU = -1100.0
CT_LIKE_SHARE = 0.05
#: The modality a DICOM series' Modality tag names, as the task registry spells channel modalities.
DICOM_MODALITIES = {"CT": "CT", "MR": "MR", "PT": "PET"}
ACCEPT_OPTION = "--accept-implausible"


@dataclass(frozen=True)
class Finding:
    """One reason a channel is not what its task expects: ``code`` is stable, ``evidence`` says what
    was measured."""

    source: str
    channel: str
    code: str
    evidence: str

    def line(self) -> str:
        return f"{self.source}: channel {self.channel}: {self.evidence}"

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "source": self.source, "channel": self.channel, "evidence": self.evidence}


@dataclass(frozen=True)
class ChannelSummary:
    """The value distribution of one channel (on the strided sample)."""

    low: float      # 0.5th percentile
    p1: float
    median: float
    high: float     # 99.5th percentile
    minimum: float
    maximum: float
    air: float      # share of voxels <= AIR_HU
    soft: float     # share of voxels within SOFT_TISSUE_HU
    ct_like: float  # share of voxels < CT_LIKE_HU
    shifted_soft: float  # share within SOFT_TISSUE_HU + 1024
    integral: bool

    @classmethod
    def of(cls, channel: np.ndarray) -> ChannelSummary:
        flat = channel.reshape(-1)
        sample = flat[:: max(1, flat.size // SAMPLE_VOXELS)]
        low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
        # CT scanners fill the corners outside the reconstructed circle with -1024, -2000 or -3024: padding,
        # not air, and it survives a missing intercept (-3024 + 1024 is still "air"); the rest is the body
        body = sample[sample >= PADDING_HU]
        body = body if body.size else sample
        p1, median = (float(v) for v in np.percentile(body, [1, 50]))
        lo, hi = SOFT_TISSUE_HU
        return cls(low, p1, median, high, float(sample.min()), float(sample.max()),
                   air=float(np.mean(body <= AIR_HU)), soft=float(np.mean((body >= lo) & (body <= hi))),
                   ct_like=float(np.mean(sample < CT_LIKE_HU)),
                   shifted_soft=float(np.mean((body >= lo + 1024) & (body <= hi + 1024))),
                   integral=bool(np.all(sample == np.round(sample))))

    def looks_like_ct(self) -> bool:
        return self.ct_like >= CT_LIKE_SHARE


def expected_modality(channel: Channel) -> str:
    """CT, MR or PET: what the task's channel declares (``T2 (MR)`` style names carry it as modality)."""
    return channel.modality.upper()


def channel_findings(summary: ChannelSummary, modality: str) -> list[tuple[str, str]]:
    """(code, evidence) of everything wrong with a channel of this distribution for ``modality``."""
    if summary.low == summary.high:
        if summary.minimum == summary.maximum:
            return [("constant", f"every voxel is {summary.minimum:g}: a constant image")]
        return [("constant", f"at least 99% of the voxels are {summary.low:g}: a near-constant image")]
    if modality == "CT":
        if summary.minimum >= 0 and summary.maximum <= 1:
            return [("not_hu", f"values {summary.minimum:g} to {summary.maximum:g}: a rescaled image, not a CT in HU")]
        if summary.minimum >= 0 and summary.maximum <= 255 and summary.integral:
            return [("not_hu", f"values {summary.minimum:g} to {summary.maximum:g}: an 8-bit image, not a CT in HU")]
        if summary.air < AIR_SHARE:
            lo, hi = SOFT_TISSUE_HU
            if summary.shifted_soft >= SOFT_TISSUE_SHARE and lo + 1024 <= summary.median <= hi + 1024:
                return [("hu_offset", f"1st percentile {summary.p1:.0f}, median {summary.median:.0f}: looks like HU "
                                      "+ 1024 (a missing rescale intercept), not a CT in HU")]
            return [("not_hu", f"1st percentile {summary.p1:.0f}, {100 * summary.air:.1f}% of voxels at or below "
                               f"{AIR_HU:.0f} (no air): not a CT in HU")]
        if summary.soft < SOFT_TISSUE_SHARE:
            lo, hi = SOFT_TISSUE_HU
            return [("not_hu", f"only {100 * summary.soft:.1f}% of voxels within {lo:.0f} to {hi:.0f} HU (soft "
                               "tissue): not a CT in HU")]
        return []
    if summary.looks_like_ct():
        return [("looks_like_ct", f"{100 * summary.ct_like:.0f}% of voxels below {CT_LIKE_HU:.0f} (1st percentile "
                                  f"{summary.p1:.0f}, as air in HU): a CT, not {article(modality)} {modality}")]
    return []


def channel_sources(paths: Sequence[str | Path], channels: int) -> list[str]:
    """A name per channel for messages: each channel's file, or for the volumes of one 4-D file that file
    with the volume's number (equal names mean one file given twice, see ``check_inputs``)."""
    if len(paths) == channels:
        return [str(p) for p in paths]
    return [f"{paths[0]} (volume {i + 1})" for i in range(channels)]


def check_inputs(data: np.ndarray, channels: Sequence[Channel], sources: Sequence[str],
                 dicom_modalities: Sequence[str] = ()) -> list[Finding]:
    """Every finding for a case's ``(c, z, y, x)`` ``data`` read from ``sources`` (one name per channel:
    equal names are the same file given twice), against the task's ``channels``."""
    findings: list[Finding] = []
    for i in range(len(channels)):  # first: a duplicate explains whatever else its channel shows
        for j in range(i):
            if sources[i] == sources[j] or _same_path(sources[i], sources[j]):
                findings.append(Finding(sources[i], channels[i].name, "duplicate_channel",
                                        f"is the same file as channel {channels[j].name}"))
            elif np.array_equal(data[i], data[j]):
                findings.append(Finding(sources[i], channels[i].name, "duplicate_channel",
                                        f"holds the same voxels as channel {channels[j].name} ({sources[j]})"))
    summaries = [ChannelSummary.of(data[i]) for i in range(data.shape[0])]
    for i, (channel, summary) in enumerate(zip(channels, summaries)):
        source, wanted = sources[i], expected_modality(channel)
        tag = dicom_modalities[i].upper() if i < len(dicom_modalities) else ""
        if tag in DICOM_MODALITIES and DICOM_MODALITIES[tag] != wanted:
            findings.append(Finding(source, channel.name, "dicom_modality",
                                    f"the DICOM series is {tag}; the task's channel {channel.name} is {wanted}"))
            continue
        findings += [Finding(source, channel.name, code, evidence)
                     for code, evidence in channel_findings(summary, wanted)]
    return findings


def scan_modality(data: np.ndarray, dicom_modality: str = "") -> tuple[str, str]:
    """(CT or MR, why) for choosing tasks by modality (``--task all`` and task lists): the DICOM tag where
    there is one, else CT if the first channel has air in HU."""
    tag = dicom_modality.upper()
    if tag in DICOM_MODALITIES:
        return DICOM_MODALITIES[tag], f"DICOM Modality {tag}"
    summary = ChannelSummary.of(data[0])
    share = f"{100 * summary.ct_like:.0f}% of voxels below {CT_LIKE_HU:.0f}"
    return ("CT", share) if summary.looks_like_ct() else ("MR", share)


def enforce(findings: Sequence[Finding], *, accept: bool) -> list[Finding]:
    """Refuse the case on its first finding (one line, naming the option that accepts it), or, with
    ``accept``, log each as a warning and return them for the case record."""
    if not findings:
        return []
    if not accept:
        raise ImplausibleInputError(f"{findings[0].line()}; {ACCEPT_OPTION} segments it anyway")
    for finding in findings:
        log.warning("%s (accepted: %s)", finding.line(), ACCEPT_OPTION)
    return list(findings)


def _same_path(a: str, b: str) -> bool:
    try:
        return a != b and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def article(word: str) -> str:
    """'an MR', 'a CT': the article as the letter's name is spoken."""
    return "an" if word[:1] in "AEFHILMNORSX" else "a"

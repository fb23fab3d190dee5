"""The table of docs/quality.md: every real scan of ../shared/data (and tests/data) through the input
checks as what it is and as the wrong modality, and bad variants of each (all must be refused).

    python tools/input_check_table.py [--shared ../shared/data] > table.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from uniseg_cli.io.images import read_channels
from uniseg_cli.quality.plausibility import ChannelSummary, check_inputs
from uniseg_cli.tasks import Channel

CT = Channel("CT", "CT", "ct", (-1000.0, 1000.0))
MR = Channel("MR", "MR")
PET = Channel("PET", "PET")


def scans(shared: Path, tests: Path) -> list[tuple[str, Path]]:
    found = [("CT", tests / "example_ct.nii.gz"), ("CT", tests / "example_ct_dicom"), ("CT", tests / "ct_dicom_3slice"),
             ("CT", shared / "ct_abdomen_totalseg/example_ct_sm.nii.gz"), ("MR", tests / "example_mr_sm.nii.gz")]
    found += [("MR", p) for p in sorted(shared.glob("brats2021_flair/imagesTr/*.nii.gz"))]
    found += [("MR", p) for p in sorted(shared.glob("mr_lesions_pyradiomics/*_image.nrrd"))]
    found += [("MR", p) for p in sorted(shared.glob("prostatex_t2_adc_nolabel/*.nii.gz"))]
    found += [("MR", p) for p in sorted(shared.glob("brats2015_deepmedic/*/*/*_subtrMeanDivStd.nii.gz"))]
    found += [("MR", p) for p in sorted(shared.glob("brain_tcga_4ch/*/*_brainles/raw_bet/*.nii.gz"))]
    return [(m, p) for m, p in found if p.exists()]


def verdict(data: np.ndarray, channel: Channel, name: str, modalities: tuple[str, ...] = ()) -> str:
    findings = check_inputs(data, [channel], [name], modalities)
    return "passes" if not findings else f"refused: {findings[0].code}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    tests = Path(__file__).resolve().parents[1] / "tests" / "data"
    print("| scan | is | 1st pct | air ≤ -800 | soft tissue -150..250 | below -500 | as itself | as the other |")
    print("|---|---|---|---|---|---|---|---|")
    bad: list[str] = []
    for modality, path in scans(args.shared, tests):
        data, geometry = read_channels([path], allow_gaps=True)
        s = ChannelSummary.of(data[0])
        own, other = (CT, MR) if modality == "CT" else (MR, CT)
        print(f"| `{path.name}` | {modality}{' (DICOM)' if geometry.modality else ''} | {s.p1:.0f} | {100 * s.air:.1f}% | "
              f"{100 * s.soft:.1f}% | {100 * s.ct_like:.1f}% | {verdict(data, own, path.name, geometry.modalities)} | "
              f"{verdict(data, other, path.name, geometry.modalities)} |")
        if modality == "CT":
            values = data[0]
            variants = {"+1024 (no intercept)": values + 1024, "all 0": values * 0,
                        "rescaled 0-1": (values - values.min()) / (values.max() - values.min()),
                        "8-bit 0-255": np.round((np.clip(values, -1000, 1000) + 1000) / 2000 * 255)}
            for what, variant in variants.items():
                bad.append(f"| `{path.name}` {what} | CT | {verdict(variant[None], CT, path.name)} |")
            pair = np.stack([values, values])
            bad.append(f"| `{path.name}` twice (CT + PET) | CT, PET | {_pair(pair, path.name)} |")
            bad.append(f"| `{path.name}` as PET | PET | {verdict(data, PET, path.name, geometry.modalities)} |")
    print()
    print("| bad variant | given as | verdict |")
    print("|---|---|---|")
    print("\n".join(bad))
    return 0


def _pair(pair: np.ndarray, name: str) -> str:
    findings = check_inputs(pair, [CT, PET], [name, name + " (copy)"])
    return "passes" if not findings else f"refused: {findings[0].code}"


if __name__ == "__main__":
    sys.exit(main())

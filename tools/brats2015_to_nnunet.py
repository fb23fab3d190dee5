"""Write the four labelled BraTS 2015 cases of ../shared/data/brats2015_deepmedic as an nnU-Net v2 dataset.

    python tools/brats2015_to_nnunet.py OUT_FOLDER [--shared ../shared/data] [--regions]

Channels FLAIR (0000) and post-contrast T1 (0001), z-scored inside the brain mask as the source provides
them, and 0 outside it (the source holds each channel's z-scored zero there, e.g. -3.55): BraTS images
as users have them are skull-stripped with a zero background, which the crop to the non-zero box then
removes (docs/pipeline.md §3), so that training patches fall on the brain. Labels mapped to the registry's brain-tumour classes (docs/pipeline.md §2): edema 2 → 1,
necrosis 1 and non-enhancing 3 → 2 (the tumour core without enhancement), enhancing 4 → 3. With
--regions, dataset.json declares them as nnU-Net v2 regions instead, as BraTS is scored: whole tumour
[1, 2, 3] (source 1, 2, 3, 4), tumour core [2, 3] (source 1, 3, 4), enhancing tumour [3] (source 4), with
regions_class_order [1, 2, 3]. Also writes OUT_FOLDER/splits.json: train/ cases for training,
validation/ cases held out (one fold).
The data are CC BY-NC-SA 3.0: do not ship the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MAPPING = {0: 0, 2: 1, 1: 2, 3: 2, 4: 3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--regions", action="store_true", help="declare whole tumour, tumour core, enhancing regions")
    args = parser.parse_args()
    source = args.shared / "brats2015_deepmedic"
    (args.out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (args.out / "labelsTr").mkdir(exist_ok=True)
    split: dict[str, list[str]] = {"train": [], "val": []}
    for part, key in (("train", "train"), ("validation", "val")):
        for case in sorted((source / part).iterdir()):
            brain = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "brainmask.nii.gz"))) > 0
            for channel, name in enumerate(("Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd")):
                image = sitk.ReadImage(str(case / f"{name}.nii.gz"))
                masked = sitk.GetImageFromArray(np.where(brain, sitk.GetArrayFromImage(image), 0).astype(np.float32))
                masked.CopyInformation(image)
                sitk.WriteImage(masked, str(args.out / "imagesTr" / f"{case.name}_{channel:04d}.nii.gz"),
                                useCompression=True)
            labels = sitk.ReadImage(str(case / "OTMultiClass.nii.gz"))
            array = sitk.GetArrayFromImage(labels).astype(np.int64)
            mapped = sitk.GetImageFromArray(np.vectorize(MAPPING.__getitem__, otypes=[np.uint8])(array))
            mapped.CopyInformation(labels)
            sitk.WriteImage(mapped, str(args.out / "labelsTr" / f"{case.name}.nii.gz"), useCompression=True)
            split[key].append(case.name)
    labels = ({"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]}
              if args.regions else {"background": 0, "edema": 1, "non-enhancing tumour": 2, "enhancing tumour": 3})
    (args.out / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1ce"},
        "labels": labels, **({"regions_class_order": [1, 2, 3]} if args.regions else {}),
        "numTraining": len(split["train"]) + len(split["val"]), "file_ending": ".nii.gz",
        "licence": "CC BY-NC-SA 3.0 (BRATS 2015 via DeepMedic); not for redistribution with uniseg"}, indent=2))
    (args.out / "splits.json").write_text(json.dumps([split], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

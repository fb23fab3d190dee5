"""What a structure is expected to look like in an adult scan: present or not, a plausible volume, how
many connected pieces. The quality flags (``uniseg_cli.quality.flags``) judge each label against it.

Volumes: Geraghty et al., "Normal organ volume assessment from abdominal CT", Abdominal Imaging
29(4):482-490, 2004 (149 adult CTs, organs outlined by hand). Their mean volumes, women / men: liver
1411 / 1710 mL, spleen 179.8 / 238.4 mL, one kidney 156.5 / 193.1 mL, pancreas 64.4 / 87.4 mL. The
plausible range here is deliberately wide, about a quarter of the women's mean to three to five times
the men's (enlarged organs are real; a tenth of an organ, or ten livers, is a segmentation error):
a result outside it is flagged for review, not refused. The UniSeg kidney label holds both kidneys
(one after a nephrectomy), hence its lower bound of one small kidney. Structures without a source
(vessels, vertebrae, prostate, tumours and lesions) get no volume range.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Anatomy:
    """``expected``: the structure is in every scan its task is run on (its absence is flagged);
    ``volume_ml``: the plausible adult range or None; ``pieces``: connected components it normally has
    (None: any number, as tumours and lesions)."""

    expected: bool = False
    volume_ml: tuple[float, float] | None = None
    pieces: int | None = None
    source: str = ""


GERAGHTY_2004 = "Geraghty et al. 2004, Abdominal Imaging 29:482"

#: Keyed by the structure's name in the task registry (every task that names a structure alike shares it).
ANATOMY: dict[str, Anatomy] = {
    "liver": Anatomy(expected=True, volume_ml=(350.0, 5000.0), pieces=1, source=GERAGHTY_2004),
    "spleen": Anatomy(expected=True, volume_ml=(45.0, 1500.0), pieces=1, source=GERAGHTY_2004),
    "kidney": Anatomy(expected=True, volume_ml=(60.0, 1000.0), pieces=2, source=GERAGHTY_2004),
    "pancreas": Anatomy(expected=True, volume_ml=(15.0, 300.0), pieces=1, source=GERAGHTY_2004),
    "prostate": Anatomy(expected=True, pieces=1),
    "hepatic vessel": Anatomy(expected=True),
    "vertebrae": Anatomy(expected=True),
}


def anatomy_of(name: str) -> Anatomy:
    """The table's entry for a structure name, or nothing expected (tumours, lesions, unknown names)."""
    return ANATOMY.get(name.lower(), Anatomy())

"""Knowing when a result is wrong: whether an input is the kind of scan its task expects
(``plausibility``), how confident the network was (``confidence``), which results need a look
(``flags``, with the anatomy they are judged against in ``anatomy``), and nnU-Net's connected-component
post-processing (``postprocess``). docs/quality.md states every definition and threshold.
"""

"""What ``uniseg predict`` writes besides the label map: DICOM SEG, RT Structure Sets, 3D Slicer
segmentations, label tables, previews and intensity statistics.

Each writer takes the label map on the input's grid with its legend and writes one file to the path
it is given (a temporary name: the predictor publishes a case's outputs together, see
``uniseg_cli.io.atomic.atomic_files``). The libraries they need are imported only when used.
"""

"""The UniSeg network and its files (safetensors model folders, legacy nnU-Net v1 checkpoints, exports)."""

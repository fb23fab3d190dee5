"""Training UniSeg: patch sampling, augmentation on the training device, loss, and the training loop."""

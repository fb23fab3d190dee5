"""Training UniSeg: patch sampling, augmentation on the training device, loss, the training loop, fine-tuning."""

"""Inference: the predictor, batches of cases, the sliding window, run settings and the allocator."""

"""Training: config, data path, the per-worker loop and its Ray Train wrapper."""

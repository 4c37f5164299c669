"""Sweeps: Ray Tune grids of training runs (``allcluster sweep --config CFG``)."""

"""``allcluster explain``: PNG panels (the image and each method's heatmap) for a few images.

An application on top of the tensor-only explainers in :mod:`allcluster.xai`: it reads files, loads
model folders and draws with matplotlib, which ``xai/`` never does.
"""

"""``allcluster weights fetch``: pre-stage pretrained weights where there is internet.

Compute nodes never download. Run this on a login node (or any machine with internet) with
``HF_HOME``/``TORCH_HOME`` pointing at a shared filesystem; jobs then find the weights offline.
"""
from __future__ import annotations

import os

# This command is the one place allowed online; it must say so before timm/huggingface_hub load.
os.environ["HF_HUB_OFFLINE"] = "0"


def fetch_weights(backbone: str) -> str:
    """Download one registry backbone's pretrained weights into the local caches; returns a summary."""
    from allcluster.models.registry import get_spec

    spec = get_spec(backbone)
    if not spec.timm_name:
        raise ValueError(f"{backbone}: has no public pretrained weights")
    spec.build(True, 3)
    return f"{backbone}: cached (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}, " \
           f"TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')})"

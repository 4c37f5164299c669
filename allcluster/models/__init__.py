"""Models: the backbone registry (timm names + ALL-Net) and the classifier built from it."""
from allcluster.models.registry import REGISTRY, BackboneSpec, HeadSpec, get_spec  # noqa: F401
from allcluster.models.classifier import (  # noqa: F401
    Classifier, Head, WeightsNotFoundError, build_model, check_weights_available, resolve_module)

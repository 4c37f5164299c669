"""``allcluster bench cam`` and ``bench lime``: our explainers against pytorch-grad-cam and lime."""
from __future__ import annotations

import argparse
import time

from allcluster.bench.common import bench_model, device_info, interleaved_rates, real_images


def bench_cam(args: argparse.Namespace) -> dict:
    """Our Grad-CAM (prediction + map in one pass, on the device) vs pytorch-grad-cam's GradCAM."""
    import torch
    from pytorch_grad_cam import GradCAM as TheirGradCAM

    from allcluster.models import resolve_module
    from allcluster.xai import make_explainer

    model, layer, device = bench_model(args.backbone)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    ours = make_explainer("gradcam", model, layer)
    theirs = TheirGradCAM(model=model, target_layers=[resolve_module(model, layer)])

    def forward():
        with torch.no_grad():
            model(images)
    result = interleaved_rates({
        "forward_images_per_s": forward, "ours_images_per_s": lambda: ours.explain(images),
        "pytorch_grad_cam_images_per_s": lambda: theirs(input_tensor=images, targets=None)},
        len(images), args.repeat)
    return {"benchmark": "cam",
            "meaning": "Images/s (median of alternating rounds) of Grad-CAM heatmaps with the prediction for "
                       "random inputs: ours (one forward + a backward that stops at the CAM layer, maps kept on "
                       "the device) vs pytorch-grad-cam's GradCAM (fp32), "
                       "and the bare forward pass; speedup = ours / pytorch-grad-cam, target >= 10 on a GPU.",
            "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
            **{k: round(v, 1) for k, v in result.items()},
            "speedup": round(result["ours_images_per_s"] / result["pytorch_grad_cam_images_per_s"], 2),
            "device": device_info()}


def bench_lime(args: argparse.Namespace) -> dict:
    """Our batched LIME vs the lime package, same model, device, image and num_samples."""
    import numpy as np
    import torch
    from lime import lime_image

    from allcluster.data.decode import load
    from allcluster.data.normalize import Normalize
    from allcluster.data.preprocess import resize
    from allcluster.models import get_spec
    from allcluster.xai import ExplainSettings, make_explainer

    model, layer, device = bench_model(args.backbone)
    spec = get_spec(args.backbone)
    norm = Normalize(spec.mean, spec.std).to(device)
    path = real_images(args.data, 1)[0]
    rgb = resize(load(path).array, args.image_size)

    def classify(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(batch * 255.0, dtype=torch.float32, device=device).permute(0, 3, 1, 2)
            return torch.softmax(model(norm(x)), dim=1).cpu().numpy()

    image = norm(torch.as_tensor(rgb, device=device).permute(2, 0, 1)[None])
    ours = make_explainer("lime", model, layer, ExplainSettings(lime_samples=args.num_samples))
    start = time.perf_counter()
    ours.explain(image)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    lime_image.LimeImageExplainer(random_state=0).explain_instance(
        rgb.astype(np.float64) / 255.0, classify, top_labels=1, num_samples=args.num_samples,
        batch_size=100, random_seed=0)
    theirs_s = time.perf_counter() - start
    return {"benchmark": "lime",
            "meaning": "Seconds per image of a LIME explanation with the same model, device, image, "
                       "segmentation and num_samples: ours (perturbations built and scored in batches on "
                       "the device) vs the lime package; speedup = lime / ours, target >= 10.",
            "backbone": args.backbone, "image_size": args.image_size, "num_samples": args.num_samples,
            "image": str(path), "ours_seconds": round(ours_s, 3), "lime_package_seconds": round(theirs_s, 3),
            "speedup": round(theirs_s / ours_s, 2), "device": device_info()}

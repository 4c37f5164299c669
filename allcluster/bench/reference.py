"""The loops a user writes instead of ``allcluster score``: ``bench score``'s references.

- ``bare``: PIL decode + resize + forward in batches, nothing written (the throughput ceiling of a
  plain script on this machine);
- ``gradcam``: the same plus pytorch-grad-cam's ``GradCAM`` on the backbone's CAM layer and one PNG
  heatmap file per image (the loop the papers' code suggests).

Run as ``python -m allcluster.bench.reference {bare,gradcam} MODEL_DIR LIST [OUT_DIR]`` so the bench
times the whole command (interpreter start, imports and model load included), as it times
``allcluster score``. Prints one JSON line: images, seconds inside the loop.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

BATCH = 32


def _batches(paths: list[str], size: int):
    """(paths, uint8 NCHW tensor) per batch of ``BATCH`` files, decoded and resized with PIL."""
    import numpy as np
    import torch
    from PIL import Image

    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        pixels = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in chunk]
        yield chunk, torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)


def _save_png(cam, path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).save(path)


def run(mode: str, model_dir: str, listing: str, out: str | None = None) -> dict:
    """One reference loop over the files in ``listing``; returns images and loop seconds."""
    import torch

    from allcluster.models import resolve_module
    from allcluster.models.model_dir import load_model_dir

    loaded = load_model_dir(model_dir, "cpu")
    model, size, normalize = loaded.model.eval(), loaded.card.input_size, loaded.card.normalize()
    paths = [line for line in Path(listing).read_text().splitlines() if line]
    cam = None
    if mode == "gradcam":
        from pytorch_grad_cam import GradCAM

        cam = GradCAM(model=model, target_layers=[resolve_module(model, loaded.card.cam_layer)])
        Path(out).mkdir(parents=True, exist_ok=True)
    start, done = time.perf_counter(), 0
    for chunk, pixels in _batches(paths, size):
        x = normalize(pixels)
        if cam is None:
            with torch.inference_mode():
                model(x).softmax(1)
        else:
            maps = cam(input_tensor=x, targets=None)           # forward + backward, the top class's map
            for path, heatmap in zip(chunk, maps):
                _save_png(heatmap, Path(out) / f"{done:08d}-{Path(path).stem}.png")
                done += 1
            continue
        done += len(chunk)
    return {"mode": mode, "images": done, "loop_seconds": round(time.perf_counter() - start, 2)}


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:])))

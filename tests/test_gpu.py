"""CUDA paths (run by `allcluster bench gpu` / jobs/gpu_acceptance.sh on a GPU machine; skipped without one)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_scoring_on_cuda_in_bf16_channels_last_agrees_with_the_cpu_in_fp32(tiny_model_dir, synthetic_dir, tmp_path):
    from tests.test_score import _decoded, score_config, scored_rows

    paths = sorted(synthetic_dir.rglob("*.jpg"))[::10][:8]
    rows = {}
    for device in ("cpu", "cuda"):
        cfg = score_config(tiny_model_dir, tmp_path, tmp_path / device,
                           explain={"budget": {"methods": []}}, workers={"device": device})
        rows[device] = scored_rows(cfg, _decoded(paths), f"run-{device}")
    cpu, gpu = rows["cpu"], rows["cuda"]
    assert (cpu["status"] == "ok").all() and (gpu["status"] == "ok").all()
    probs = [c for c in cpu.columns if c.startswith("prob_")]
    assert np.abs(cpu[probs].to_numpy() - gpu[probs].to_numpy()).max() < 0.05, "bf16 stays close to fp32"
    assert (cpu["predicted_class"] == gpu["predicted_class"]).mean() >= 0.75


def test_training_on_cuda_in_bf16_runs_and_exports(synthetic_manifest, tmp_path):
    import math

    from allcluster.train.loop import WorkerRun
    from allcluster.train.session import LocalSession
    from tests.conftest import tiny_train_config

    cfg = tiny_train_config(synthetic_manifest, tmp_path / "cuda", fit={"epochs": 1},
                            resources={"use_gpu": True, "num_workers": 1})
    final = WorkerRun(cfg, LocalSession(tmp_path / "cuda" / "checkpoints", "cuda")).run()
    assert math.isfinite(final["val_loss"]) and (tmp_path / "cuda" / "model" / "model_card.json").is_file()


def test_a_device_side_assert_is_told_apart_from_out_of_memory():
    """A real device-side assert (an index out of range in a kernel) breaks the CUDA context of its
    process for good, so it runs in a child: what allcluster.device.device_is_broken must recognise
    (the scoring replica then ends for a fresh process); an out-of-memory error must stay recoverable."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from allcluster.device import device_is_broken\n"
        "try:\n"
        "    torch.empty(2**50, device='cuda')\n"
        "except Exception as err:\n"
        "    print('oom', device_is_broken(err))\n"
        "try:\n"
        "    x = torch.zeros(4, device='cuda')[torch.tensor([99], device='cuda')]\n"
        "    torch.cuda.synchronize()\n"
        "except Exception as err:\n"
        "    print('assert', device_is_broken(err), type(err).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "oom False" in done.stdout and "assert True" in done.stdout, done.stdout + done.stderr[-2000:]

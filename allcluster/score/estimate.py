"""``allcluster score --dry-run``: the job's size and its time, predicted from measured costs.

A probe of up to ``PROBE`` of the job's own files is read, decoded, predicted and explained on this
machine (heatmaps go to a temporary folder); the steady per-image costs (median of five timed
batches after two warm-ups) are scaled to the files still to do, the expected share selected for the
expensive methods (as the probe's), the job-wide cap, and the model replicas the pipeline would
start here. On a CPU node the decode tasks and the model replicas share the cores, so their times
add up (the decode's CPU seconds spread over the cores); on GPUs they overlap. Start-up
(interpreter, Ray, actor start, model load, up to the first row) is taken from the last run into
the same OUT (its ``summary.json``), else from the probe's own cold start (:func:`fresh_startup_s`).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from allcluster.console import process_age_s
from allcluster.models.card import ModelCard
from allcluster.score.budget import budget_reasons
from allcluster.score.reading import read_decode
from allcluster.score.config import ScoreConfig
from allcluster.score.inputs import Shard
from allcluster.score.output import RowsState, check_job_settings, with_journaled_rows

if TYPE_CHECKING:
    from allcluster.score.core import Scorer

PROBE = 32          # images: one batch of the default size
# A fresh OUT's start-up, in units of the probe's cold start (importing torch, building the scorer,
# its first batch): a job starts Ray and Ray Data, then its replica does that same cold start, all
# on the node's cores, so both scale with the node's speed. Measured with `allcluster bench score`
# (ALL-Net 224 px, default config, 2,000 images) on a 2-core AVX-512 EPYC, 2026-12-01: first row
# after 13.3-15.0 s with a 2.5-2.6 s cold start. A Slurm job's Ray starts before its driver and is
# not counted in seconds_to_first_row: there this overestimates by Ray's start (5-8 s).
STARTUP_PER_COLD_START = 5.0
# On a CPU node a replica's batches take longer inside the job than alone in the probe: the decode
# tasks, the driver (rows, heatmap packs) and Ray Data's own work share the replica's cores. Same
# bench and machine: 15.4 ms per image from first row to last vs the probe's steady 11.3 ms.
CPU_SHARED_SLOWDOWN = 1.35


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def measure(cfg: ScoreConfig, paths: list[str], card: ModelCard) -> dict:
    """Per-image milliseconds of decode, of the every-image work and of the budgeted methods."""
    import numpy as np

    batch = {"path": np.array(paths, dtype=object)}
    decode_s, decoded = _timed(read_decode, batch, card.input_size, card.roi_crop, card.roi_margin, cfg.max_pixels, lambda shas, p: [""] * len(shas),
                               cfg.max_bytes)
    cold = time.perf_counter()
    from allcluster.score.core import Scorer       # torch: a replica's first import, part of its cold start

    with tempfile.TemporaryDirectory() as tmp:
        # one model load: a reserve that grants nothing keeps the budgeted methods out of the timed pass
        scorer = Scorer(cfg, tmp, "dry-run", lambda n, batch: 0)
        scorer(decoded)                                  # first batch: allocations, kernel selection
        cold_start_s = time.perf_counter() - cold
        for _ in range(2):                               # warm-up: huge pages come in over the first batches
            scorer(decoded)
        cheap_s, table = sorted((_timed(scorer, decoded) for _ in range(5)), key=lambda run: run[0])[2]
        rows = table.select(scorer.schema.names).to_pylist()
        ok = [r for r in rows if r["status"] == "ok"]
        reasons = budget_reasons(np.array([r["confidence"] for r in ok]), [r["predicted_class"] for r in ok],
                                      [r["sha256"] for r in ok], cfg.explain.budget)
        budget_ms = measure_budget(scorer, decoded, ok)
    return {"decode_ms": 1e3 * decode_s / len(paths), "every_image_ms": 1e3 * cheap_s / max(1, len(ok)),
            "budget_ms": budget_ms, "selected_share": sum(map(bool, reasons)) / max(1, len(ok)),
            "cold_start_s": round(cold_start_s, 2),
            "probe_images": len(paths), "probe_errors": len(rows) - len(ok), "device": scorer.constants["device"]}


def measure_budget(scorer: Scorer, decoded: dict, ok_rows: list[dict]) -> float:
    """Milliseconds per image of all budgeted methods together, on up to two probe images."""
    import numpy as np
    import torch

    if not scorer.budgeted or not ok_rows:
        return 0.0
    keep = [i for i, s in enumerate(decoded["status"]) if s == "ok"][:2]
    x = scorer.normalize(torch.from_numpy(np.asarray(decoded["pixels"])[keep]).to(scorer.device).permute(0, 3, 1, 2))
    start = time.perf_counter()
    for explainer in scorer.budgeted.values():
        explainer.explain(x)
    return 1e3 * (time.perf_counter() - start) / len(keep)


def estimate(cfg: ScoreConfig, retry_errors: bool = False, shard: Shard = Shard()) -> dict:
    """The dry run's numbers (see the module docstring), for ``shard`` (an array task's part) of the
    job. An ``out`` whose rows the run would refuse to add to (another model, other row settings) is
    refused here too: an estimate of a run that cannot happen would mislead."""
    from allcluster.score.ray_data import job_settings, actor_plan, plan_job

    card = ModelCard.read(cfg.model)
    out = Path(cfg.out).resolve()
    check_job_settings(out, job_settings(card, cfg), record=False)
    # as the run will: after recovering what a killed run's journal holds (read here, not written)
    state = with_journaled_rows(out, RowsState.read(out))
    job = plan_job(cfg, out, retry_errors, shard, state)
    driver_s = process_age_s()                 # the job's driver gets this far before it starts Ray
    todo = job.todo.files.column("path")
    result = {"inputs": job.inputs, "listing_errors": len(job.todo.errors), "already_scored": job.done,
              "to_do": len(job.todo)}
    if not len(todo):
        return result
    probe = todo.take(list(range(0, len(todo), max(1, len(todo) // PROBE)))[:PROBE]).to_pylist()
    costs = measure(cfg, probe, card)
    import torch                               # imported (and timed) by measure

    local = {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}
    plan = actor_plan(cfg, local)
    cap_left = max(0, shard.share(cfg.explain.budget.max_images) - state.budget_used(shard))
    selected = min(cap_left, round(costs["selected_share"] * len(todo)))
    startup_s, startup_from = earlier_startup(out, fresh_startup_s(driver_s, costs["cold_start_s"]))
    result.update(costs, replicas=plan["size"], budget_selected=selected, budget_cap_left=cap_left,
                  startup_from=startup_from,
                  **job_seconds(len(todo), selected, costs, plan, local["CPU"], cfg.workers.decode_cpus, startup_s))
    return result


def fresh_startup_s(driver_s: float, cold_start_s: float) -> float:
    """Seconds to the first row of a job into a fresh OUT: the driver's own start (listing included),
    then Ray, Ray Data and a replica's cold start (``STARTUP_PER_COLD_START`` probe cold starts)."""
    return driver_s + STARTUP_PER_COLD_START * cold_start_s


def earlier_startup(out: Path, fresh_s: float) -> tuple[float, str]:
    """Seconds to the first row of the last run into ``out`` (its summary.json), else ``fresh_s``
    (labelled "probe")."""
    try:
        return float(json.loads((out / "summary.json").read_text())["seconds_to_first_row"]), "summary.json"
    except (OSError, ValueError, KeyError, TypeError):
        return fresh_s, "probe"


def job_seconds(to_do: int, selected: int, costs: dict, plan: dict, cpus: float, decode_cpus: float,
                startup_s: float) -> dict:
    """The estimate's arithmetic: model time over the replicas (on CPU slowed by the cores it shares,
    ``CPU_SHARED_SLOWDOWN``), decode time, start-up, and the total (see the module docstring for why
    CPU times add and GPU times overlap)."""
    model_s = (to_do * costs["every_image_ms"] + selected * costs["budget_ms"]) / 1e3 / plan["size"]
    decode_cpu_s = to_do * costs["decode_ms"] / 1e3
    if plan["device"] == "cpu":
        model_s *= CPU_SHARED_SLOWDOWN
        decode_s = decode_cpu_s / max(1.0, cpus)
        busy_s = model_s + decode_s
    else:
        decode_s = decode_cpu_s / max(1.0, (cpus - plan["size"] * plan["num_cpus"]) / decode_cpus)
        busy_s = max(model_s, decode_s)
    return {"estimated_startup_s": round(startup_s, 1), "estimated_model_s": round(model_s, 1),
            "estimated_decode_s": round(decode_s, 1), "estimated_total_s": round(startup_s + busy_s, 1)}


def dry_run_text(cfg: ScoreConfig, retry_errors: bool = False, shard: Shard = Shard()) -> str:
    """Human summary plus the JSON numbers."""
    numbers = estimate(cfg, retry_errors, shard)
    lines = [f"[score --dry-run] {numbers['inputs']} inputs ({numbers['listing_errors']} listing errors), "
             f"{numbers['already_scored']} already scored, {numbers['to_do']} to do"]
    if "estimated_total_s" in numbers:
        hours = numbers["estimated_total_s"] / 3600
        lines.append(f"[score --dry-run] measured on {numbers['device']} over {numbers['probe_images']} of the files: "
                     f"decode {numbers['decode_ms']:.1f} ms, predict + every-image explanations "
                     f"{numbers['every_image_ms']:.1f} ms, budgeted methods {numbers['budget_ms']:.1f} ms per image; "
                     f"{numbers['budget_selected']} images selected for the budget")
        lines.append(f"[score --dry-run] estimate with {numbers['replicas']} model replica(s) like this machine's: "
                     f"{numbers['estimated_total_s']:.0f} s ({hours:.2f} h), of which start-up "
                     f"{numbers['estimated_startup_s']:.0f} s ({numbers['startup_from']}); with more nodes the "
                     "rest scales down with the replica count")
    return "\n".join(lines) + "\n" + json.dumps(numbers, indent=2)

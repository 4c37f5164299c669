"""Scoring: listing rules, the pure stages, and real Ray Data jobs over real ALL images and a zoo of
broken files (rows, heatmaps, duplicates, budgets, resume after SIGKILL)."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pandas as pd
import pytest
import torch
from PIL import Image

import imagezoo
from allcluster.config import ConfigError, from_dict, read_yaml
from allcluster.score import core
from allcluster.score.budget import budget_reasons
from allcluster.score.ledger import Ledger
from allcluster.score.reading import read_decode
from allcluster.score.config import ScoreConfig, check
from allcluster.score.inputs import Shard, list_inputs
from allcluster.score.heatmaps import load_heatmap
from allcluster.score.journal import read_journal
from allcluster.score.output import check_job_settings, lock_output
from conftest import REPO, real_images, tmpfs

CI_TINY = REPO / "configs" / "score" / "ci_tiny.yaml"


def score_config(model: Path, source: Path, out: Path, **keys) -> ScoreConfig:
    import yaml

    data = {**yaml.safe_load(CI_TINY.read_text()), "model": str(model), "input": str(source), "out": str(out)}
    for key, value in keys.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return check(from_dict(ScoreConfig, data, "test"), "test")


def tree_fingerprint(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK)}


# ---- listing ------------------------------------------------------------------------------------------
def test_listing_follows_inner_symlinks_and_refuses_those_leaving_the_root(tmp_path):
    root, outside = tmp_path / "dump", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "cell.jpg").write_bytes(imagezoo.jpeg_bytes())
    (outside / "secret.jpg").write_bytes(imagezoo.jpeg_bytes(1))
    (root / "a" / "inner-link.jpg").symlink_to(root / "a" / "cell.jpg")
    (root / "a" / "outer-link.jpg").symlink_to(outside / "secret.jpg")
    (root / "a" / "loop.jpg").symlink_to(root / "a" / "loop.jpg")
    (root / "a" / "dangling.jpg").symlink_to(root / "a" / "gone.jpg")
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "a" / "pipe.jpg")
    listing = list_inputs(root)
    assert sorted(Path(p).name for p in listing.paths) == ["cell.jpg", "inner-link.jpg"]
    errors = {Path(e["path"]).name: e["error_type"] for e in listing.errors}
    assert errors == {"outer-link.jpg": "outside_root", "loop.jpg": "symlink_loop", "dangling.jpg": "unreadable",
                      "linked-folder": "symlinked_folder", "pipe.jpg": "not_a_file"}
    assert not any("secret" in p for p in listing.paths)


def test_a_retried_files_row_goes_when_the_file_is_gone_or_a_folder_now(tmp_path):
    """A transient error row of a file no longer listed: removed when the file was deleted, or replaced by
    a folder of that name (its files are listed with rows of their own: the old row made one more row
    than inputs)."""
    from allcluster.score.ray_data import _gone

    root = tmp_path / "dump"
    (root / "now-a-folder.jpg").mkdir(parents=True)
    (root / "now-a-folder.jpg" / "inner.jpg").write_bytes(imagezoo.jpeg_bytes())
    (root / "kept.jpg").write_bytes(imagezoo.jpeg_bytes(1))
    listing = list_inputs(root)
    retried = pa.array([str(root / n) for n in ("now-a-folder.jpg", "deleted.jpg", "kept.jpg")], pa.large_string())
    assert _gone(retried, listing) == [str(root / "now-a-folder.jpg"), str(root / "deleted.jpg")]


def test_manifest_and_text_inputs_keep_their_paths_and_manifest_columns(tmp_path, synthetic_manifest):
    listing = list_inputs(synthetic_manifest)
    manifest = pd.read_parquet(synthetic_manifest)
    assert listing.paths == manifest["path"].tolist()
    assert listing.extra["label"] == manifest["label"].tolist()
    assert listing.extra["fold"] == manifest["fold"].astype(str).tolist()
    assert listing.extra["input_sha256"] == manifest["sha256"].tolist(), "a computed name gets input_"
    assert {"patient", "split", "input_status"} <= set(listing.extra) and "sha256" not in listing.extra
    own = tmp_path / "own.parquet"
    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "ward": ["W1", None], "confidence": [1, 2]}).to_parquet(own)
    assert list_inputs(own).extra == {"ward": ["W1", ""], "input_confidence": ["1", "2"]}
    text = tmp_path / "list.txt"
    text.write_text("#12 cell.jpg\nrel/a.jpg\n\n  \n/abs/b.png\n")   # no comments: `ls` prints names like #12
    assert list_inputs(text).paths == [str(tmp_path / "#12 cell.jpg"), str(tmp_path / "rel" / "a.jpg"), "/abs/b.png"]
    with pytest.raises(ConfigError, match="missing-folder"):
        list_inputs(tmp_path / "missing-folder")


def test_a_file_listed_twice_is_listed_once_with_its_first_entrys_columns(tmp_path):
    text = tmp_path / "list.txt"
    text.write_text(f"a.jpg\n./a.jpg\n{tmp_path}/a.jpg\nsub/../b.jpg\nb.jpg\n")
    assert list_inputs(text).paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"path": ["b.jpg", "a.jpg", "./b.jpg", "a.jpg"], "ward": ["W1", "W2", "W3", "W4"]}).to_parquet(manifest)
    listing = list_inputs(manifest)
    assert listing.paths == [str(tmp_path / "b.jpg"), str(tmp_path / "a.jpg")] and listing.extra == {"ward": ["W1", "W2"]}


# ---- config and bookkeeping ---------------------------------------------------------------------------
def test_unknown_method_and_missing_paths_are_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"explain.budget.methods: unknown method 'shap'.*gradcam"):
        score_config(tiny_model_dir, tmp_path, tmp_path / "o", explain={"budget": {"methods": ["shap"]}})
    with pytest.raises(ConfigError, match="input is required"):
        check(from_dict(ScoreConfig, {"model": "m", "out": "o"}), "cli")
    with pytest.raises(ConfigError, match="explain.faithfulness_fractio"):
        from_dict(ScoreConfig, {"explain": {"faithfulness_fractio": 0.1}}, "cli")


def test_rerun_into_the_same_out_with_other_row_settings_is_refused(tmp_path):
    check_job_settings(tmp_path, {"model_sha256": "a", "explain.methods": ["gradcam"]})
    check_job_settings(tmp_path, {"model_sha256": "a", "explain.methods": ["gradcam"]})
    with pytest.raises(ConfigError, match=r"explain.methods: \['gradcam'\] -> \['gradcam\+\+'\]"):
        check_job_settings(tmp_path, {"model_sha256": "a", "explain.methods": ["gradcam++"]})
    # a key added since: an older job.json implied its old value (every image's map got a faithfulness score)
    check_job_settings(tmp_path, {"model_sha256": "a", "explain.methods": ["gradcam"], "explain.faithfulness_sample": 1.0})
    with pytest.raises(ConfigError, match=r"explain.faithfulness_sample: 1.0 -> 0.05"):
        check_job_settings(tmp_path, {"model_sha256": "a", "explain.methods": ["gradcam"], "explain.faithfulness_sample": 0.05})


def test_a_rerun_with_the_same_weights_under_another_calibration_or_size_is_refused(tiny_model_dir, tmp_path):
    """Two exports of one training (same weights) can differ in temperature or input size: their rows
    must not mix in one OUT. An OUT whose job.json predates the card keys compares the weights only."""
    from allcluster.models.card import ModelCard
    from allcluster.score.ray_data import job_settings

    card, cfg = ModelCard.read(tiny_model_dir), from_dict(ScoreConfig, {})
    check_job_settings(tmp_path, job_settings(card, cfg))
    check_job_settings(tmp_path, job_settings(ModelCard.read(tiny_model_dir), cfg))
    for change, named in (({"temperature": card.temperature * 2}, "model.temperature"),
                          ({"input_size": card.input_size + 32}, "model.input_size"),
                          ({"classes": card.classes[::-1]}, "model.classes")):
        with pytest.raises(ConfigError, match=rf"already holds rows scored with other settings \({named}: "):
            check_job_settings(tmp_path, job_settings(card.replace(**change), cfg))
    older = tmp_path / "older"
    check_job_settings(older, {k: v for k, v in job_settings(card, cfg).items() if not k.startswith("model.")})
    check_job_settings(older, job_settings(card.replace(temperature=3.0), cfg))
    with pytest.raises(ConfigError, match="model_sha256"):
        check_job_settings(older, job_settings(card.replace(weights_sha256="other"), cfg))


def test_a_refused_input_leaves_no_output_and_locks_in_no_settings(tiny_model_dir, tmp_path):
    from allcluster.score.ray_data import run_score

    no_paths, garbage = tmp_path / "no-paths.parquet", tmp_path / "garbage.parquet"
    pd.DataFrame({"file": ["a.jpg"]}).to_parquet(no_paths)
    garbage.write_bytes(b"not parquet")
    holes = tmp_path / "holes.pq"           # rows naming no file: made relative, "" would be the folder
    pd.DataFrame({"path": ["a.jpg", None, "", " ", "b.jpg"]}).to_parquet(holes)
    out = tmp_path / "out"
    for source, message in [(tmp_path / "typo", "typo: input not found"),
                            (no_paths, "no-paths.parquet: a manifest to score needs a 'path' column"),
                            (holes, r"holes.pq: 3 row\(s\) have an empty or null 'path' \(row 1, 2, 3; counted from 0\)"),
                            (garbage, "garbage.parquet: cannot read this manifest as Parquet")]:
        with pytest.raises(ConfigError, match=message):
            run_score(score_config(tiny_model_dir, source, out))
        assert not out.exists(), f"{source.name}: refused after writing {sorted(os.listdir(out))}"


def test_a_run_refused_by_the_cluster_records_nothing_that_binds_the_next(ray_local, tiny_model_dir, real_data_dir,
                                                                         tmp_path):
    """workers.device cuda on a cluster with no GPU is only known once Ray runs: the refused run used to
    leave job.json (its settings, binding the next run into OUT though no row was written), model.json,
    score.yaml and a summary saying a run ended without finishing."""
    from allcluster.score.ray_data import run_score

    out = tmp_path / "out"
    cfg = score_config(tiny_model_dir, real_data_dir, out, workers={"device": "cuda"})
    with pytest.raises(ConfigError, match="workers.device: 'cuda', but the Ray cluster has no GPU"):
        run_score(cfg)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not {"job.json", "model.json", "score.yaml", "summary.json"} & set(left), left


def test_an_out_whose_rows_or_heatmaps_folder_takes_no_files_is_refused_before_scoring(tiny_model_dir, real_data_dir,
                                                                                      tmp_path, capsys):
    """Another user's folder, a read-only mount or a file where OUT/rows or OUT/heatmaps goes was found
    only at the first shard: a traceback after the scoring, or every row a write_error each rerun repeats."""
    from allcluster.cli import main

    dump, out = tmp_path / "dump", tmp_path / "out"
    dump.mkdir()
    shutil.copy(real_images(real_data_dir, 1)[0], dump / "cell.jpg")
    args = ["score", "--config", str(CI_TINY), "--model", str(tiny_model_dir), "--input", str(dump), "--out", str(out)]
    with tmpfs(out / "heatmaps", "ro,size=64k"):                     # a read-only mount
        for command in (args + ["--check"], args):
            assert main(command) == 2, command
            assert f"{out / 'heatmaps'}: cannot write into this folder" in capsys.readouterr().err, command
        assert sorted(p.name for p in out.iterdir()) == ["heatmaps"], "refused before writing anything"
    os.rmdir(out / "heatmaps")
    (out / "rows").write_text("a file where the rows folder goes")
    assert main(args) == 2 and f"{out / 'rows'}: cannot write into this folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["rows"]
    (out / "rows").unlink()
    (out / "overlays").write_text("explain.overlays' folder (the files store)")
    assert main(args) == 2 and f"{out / 'overlays'}: cannot write into this folder" in capsys.readouterr().err


def test_check_refuses_what_the_run_would_and_writes_nothing(tiny_model_dir, real_data_dir, tmp_path, capsys):
    """`--check` (what the Slurm scripts run before Ray starts): the run's own refusals, nothing written."""
    from allcluster.cli import main

    out = tmp_path / "out"
    given = {"--model": str(tiny_model_dir), "--input": str(real_data_dir), "--out": str(out)}

    def check(**changed) -> int:
        args = {**given, **{f"--{k}": str(v) for k, v in changed.items()}}
        return main(["score", "--check", "--config", str(CI_TINY), *[x for kv in args.items() for x in kv]])

    assert check() == 0 and f"a run would score {real_data_dir} with {tiny_model_dir}" in capsys.readouterr().out
    assert check(model=tmp_path / "no-model") == 2 and "no-model" in capsys.readouterr().err
    assert check(input=tmp_path / "typo") == 2 and "typo: input not found" in capsys.readouterr().err
    assert check(shard="3/3") == 2 and "--shard: '3/3' needs 0 <= K < N" in capsys.readouterr().err
    # what only the model rules out: found while scoring, CAM would make every image a retried model_error
    for setting, named in (("explain.methods=[gradcam, cam]", "explain.methods: CAM needs a head with no hidden"),
                           ("explain.budget.methods=[cam]", "explain.budget.methods: CAM needs a head"),
                           ("explain.budget.classes=[Pre, Blast]", "explain.budget.classes: 'Blast' not among")):
        code = main(["score", "--check", "--config", str(CI_TINY), *[x for kv in given.items() for x in kv],
                     "--set", setting])
        assert code == 2 and named in capsys.readouterr().err, setting
    assert not out.exists()
    task = lock_output(out, Shard(0, 2))            # array task 0 of 2 of this job is running
    assert check(shard="1/2") == 0, "array tasks run side by side"
    assert check(shard="0/2") == 2 and f"shard 0/2 of {out} is in use by another run" in capsys.readouterr().err
    assert check() == 2 and f"output folder {out} is in use by another run" in capsys.readouterr().err
    # a part of another split (ALLCLUSTER_SHARDS=3 while a 2-part job runs): its files overlap
    assert check(shard="1/3") == 2 and (f"output folder {out} (part 0/2 of another split than 1/3) is in use by "
                                        "another run") in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"part 0/2 of another split than 1/3"):
        lock_output(out, Shard(1, 3))
    for lock in task:
        lock.release()
    assert check() == 0 and check(shard="1/3") == 0, "the refused part holds nothing; ended parts leave lock files"
    check_job_settings(out, {"model_sha256": "another model"})        # an out of another job...
    held = lock_output(out)                                           # ...still running: that comes first
    before = tree_fingerprint(out)
    assert check() == 2 and f"in use by another run (host {socket.gethostname()}, pid {os.getpid()}" in capsys.readouterr().err
    for lock in held:
        lock.release()
    assert check() == 2 and "model_sha256: 'another model' -> " in capsys.readouterr().err
    assert tree_fingerprint(out) == before


def test_array_tasks_starting_in_the_same_second_get_different_run_ids():
    from allcluster.score.output import new_run_id

    ids = [new_run_id(Shard(index, 8)) for index in range(8) for _ in range(50)]
    assert len(set(ids)) == len(ids)
    assert [run_id.split("-")[2] for run_id in ids[::50]] == [f"{k:04d}" for k in range(8)]


def test_ledger_gives_each_content_one_owner_and_retries_keep_ownership():
    ledger = Ledger(budget_cap=5, budget_used=2)
    a, b = "aa" * 32, "bb" * 32
    assert ledger.claim([a, b, a], ["x", "y", "z"]) == ["", "", "x"]
    assert ledger.claim([a], ["x"]) == [""], "a retried task must still own its content"
    assert (ledger.reserve(2, "b1"), ledger.reserve(4, "b2"), ledger.reserve(1, "b3")) == (2, 1, 0)


def test_a_retried_batch_gets_back_what_its_dead_try_was_granted():
    ledger = Ledger(budget_cap=3)
    assert ledger.reserve(2, "b1") == 2
    assert ledger.reserve(2, "b1") == 2, "the dead try's grant must come back to its retry"
    assert ledger.reserve(5, "b2") == 1
    assert ledger.budget_left == 0


def test_budget_rules_pick_low_confidence_named_classes_and_a_stable_sample():
    from allcluster.score.config import BudgetConfig

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    budget = BudgetConfig(methods=["lime"], low_confidence=0.5, classes=["Pro"], sample_fraction=0.1)
    conf = np.array([0.4, 0.9, 0.9] + [0.9] * 1997)
    names = ["Pre", "Pro", "Pre"] + ["Pre"] * 1997
    reasons = budget_reasons(conf, names, shas, budget)
    assert reasons[:2] == ["low_confidence", "class"]
    share = sum(r == "sample" for r in reasons[2:]) / 1998
    assert 0.08 < share < 0.12
    assert reasons == budget_reasons(conf, names, shas, budget), "the sample must not change on rerun"
    assert set(budget_reasons(conf, names, shas, BudgetConfig(methods=[]))) == {""}


# ---- the pure stages ----------------------------------------------------------------------------------
def test_read_decode_turns_the_zoo_into_error_rows_and_skips_duplicate_decodes(tmp_path):
    bad = imagezoo.bad_files(tmp_path / "bad")
    good = imagezoo.good_files(tmp_path / "good")
    copy = tmp_path / "copy.jpg"
    shutil.copy(good["jpeg"], copy)
    paths = [str(p) for p in [*bad.values(), *good.values(), copy]]
    ledger = Ledger(0)
    out = read_decode({"path": np.array(paths, dtype=object)}, 32, False, 0.1, 10_000_000, ledger.claim)
    by_path = {p: i for i, p in enumerate(paths)}
    for name, path in bad.items():
        i = by_path[str(path)]
        assert (out["status"][i], out["error_type"][i]) == ("error", imagezoo.EXPECTED_ERROR[name]), name
        assert str(path) in out["error"][i]
    for name, path in good.items():
        i = by_path[str(path)]
        assert out["status"][i] == "ok" and out["pixels"][i].std() > 0, name
    i = by_path[str(copy)]
    assert out["duplicate_of"][i] == str(good["jpeg"]) and out["t_decode_ms"][i] == 0
    assert out["pixels"].shape == (len(paths), 32, 32, 3) and out["pixels"].dtype == np.uint8


def test_read_decode_holds_a_bounded_number_of_file_bytes_and_gives_the_same_rows(tmp_path, monkeypatch):
    """Large files (exports just under max_bytes) are read ahead only up to READ_AHEAD_BYTES before
    they are decoded: here one 4 MB file at a time instead of the whole batch's 32 MB."""
    import tracemalloc

    from allcluster.score import reading

    paths = []
    for seed in range(8):      # a real JPEG, then padding after its end marker, which decoders skip
        paths.append(tmp_path / f"big-{seed}.jpg")
        paths[-1].write_bytes(imagezoo.jpeg_bytes(seed) + bytes(4 * 2**20))
    shutil.copy(paths[0], tmp_path / "copy.jpg")
    paths.append(tmp_path / "copy.jpg")
    batch = {"path": np.array([str(p) for p in paths], dtype=object)}

    def decoded(read_ahead: int) -> tuple[dict, int, int]:
        monkeypatch.setattr(reading, "READ_AHEAD_BYTES", read_ahead)
        claims = []
        ledger = Ledger(0)
        tracemalloc.start()
        out = read_decode(batch, 32, False, 0.1, 10_000_000, lambda shas, p: claims.append(p) or ledger.claim(shas, p))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return out, peak, len(claims)

    whole, whole_peak, whole_claims = decoded(2**40)
    bounded, bounded_peak, bounded_claims = decoded(1)
    assert (whole_claims, bounded_claims) == (1, len(paths))
    assert (whole["status"] == "ok").all() and whole["duplicate_of"][-1] == str(paths[0])
    for key in ("status", "sha256", "size_bytes", "duplicate_of", "pixels"):
        assert np.array_equal(whole[key], bounded[key]), key
    assert whole_peak > 32 * 2**20 and bounded_peak < 12 * 2**20, (whole_peak, bounded_peak)


def _decoded(paths: list[Path], size: int = 64) -> dict:
    return read_decode({"path": np.array([str(p) for p in paths], dtype=object)}, size, False, 0.1,
                            10_000_000, Ledger(0).claim)


def scored_rows(cfg: ScoreConfig, decoded: dict, run_id: str = "run") -> pd.DataFrame:
    """One batch through the Scorer and the job's shard writer (which packs the maps) into ``cfg.out``."""
    from allcluster.score.output import ShardWriter

    scorer = core.Scorer(cfg, cfg.out, run_id, lambda n, batch: n)
    methods = list(cfg.explain.methods) + list(cfg.explain.budget.methods)
    writer = ShardWriter(Path(cfg.out), scorer.schema, run_id, 10_000, 3600,
                         methods if cfg.explain.heatmaps == "packed" else [])
    writer.add(scorer(decoded))
    writer.flush()
    return pd.read_parquet(writer.dir / f"part-{run_id}-00000.parquet")


@pytest.mark.parametrize("store", ["packed", "files"])
def test_scorer_rows_agree_with_a_direct_forward_and_gradcam(tiny_model_dir, real_data_dir, tmp_path, store):
    from allcluster.data.normalize import Normalize
    from allcluster.models.model_dir import load_model_dir
    from allcluster.xai import get_explainer

    paths = real_images(real_data_dir, 2)
    cfg = score_config(tiny_model_dir, tmp_path, tmp_path / "out", explain={"budget": {"methods": []}, "heatmaps": store})
    decoded = _decoded(paths)
    rows = scored_rows(cfg, decoded, "run-1")
    loaded = load_model_dir(tiny_model_dir)
    x = Normalize(tuple(loaded.card.mean), tuple(loaded.card.std))(
        torch.from_numpy(decoded["pixels"]).permute(0, 3, 1, 2))
    with torch.no_grad():
        logits = loaded.model(x)
    probs = torch.softmax(logits, 1).numpy()
    calibrated = torch.softmax(logits / 1.5, 1).numpy()
    np.testing.assert_allclose(rows[["prob_Benign", "prob_Early", "prob_Pre", "prob_Pro"]].to_numpy(), probs, atol=1e-5)
    np.testing.assert_allclose(rows[[f"cal_prob_{c}" for c in loaded.classes]].to_numpy(), calibrated, atol=1e-5)
    np.testing.assert_allclose(rows["confidence"], calibrated.max(1), atol=1e-5)
    assert rows["predicted_class"].tolist() == [loaded.classes[k] for k in calibrated.argmax(1)]
    assert (rows["uncertain"] == (rows["confidence"] < cfg.uncertain_below)).all()
    maps = get_explainer("gradcam")(loaded.model, loaded.card.cam_layer).explain(x).maps.numpy()
    expected_name = "heatmaps/part-run-1-00000.parquet" if store == "packed" else None
    for i, (rel, sha) in enumerate(zip(rows["heatmap_gradcam"], rows["sha256"])):
        assert rel == (expected_name or f"heatmaps/{sha[:2]}/{sha}.gradcam.png")
        stored = load_heatmap(tmp_path / "out" / rel, sha, "gradcam")
        assert stored.shape == (64, 64) and stored.dtype == np.uint8
        assert np.abs(stored.astype(int) - np.round(maps[i] * 255)).max() <= 1
    assert rows["faith_drop_gradcam"].notna().all() and rows["faith_kept_gradcam"].between(0, 1e3).all()
    from allcluster.data.preprocess import cell_mask
    from allcluster.xai.localisation import mass_inside
    expected = mass_inside(maps, np.stack([cell_mask(image) for image in decoded["pixels"]]))
    np.testing.assert_allclose(rows["on_cell_gradcam"], expected, atol=1e-3)     # the map's share on the cell
    assert rows["on_cell_gradcam"].between(0, 1).all()
    assert (rows["cam_method"] == "gradcam").all() and (rows["cam_layer"] == loaded.card.cam_layer).all()
    assert (rows["model_sha256"] == loaded.card.weights_sha256).all() and (rows["run_id"] == "run-1").all()


def test_the_gpu_precision_path_bf16_autocast_runs_on_cpu_and_agrees_with_fp32(tiny_model_dir, real_data_dir, tmp_path):
    paths = real_images(real_data_dir, 2)
    decoded = _decoded(paths)
    rows = {}
    for precision in ("fp32", "bf16"):
        cfg = score_config(tiny_model_dir, tmp_path, tmp_path / precision, workers={"precision": precision},
                           explain={"budget": {"methods": []}})
        assert core.Scorer(cfg, cfg.out, "run", lambda n, batch: n).bf16 == (precision == "bf16")
        rows[precision] = scored_rows(cfg, decoded)
    fp32, bf16 = rows["fp32"], rows["bf16"]
    assert (bf16["status"] == "ok").all() and bf16["heatmap_gradcam"].notna().all()
    probs = [f"cal_prob_{c}" for c in ("Benign", "Early", "Pre", "Pro")]
    np.testing.assert_allclose(bf16[probs].to_numpy(), fp32[probs].to_numpy(), atol=0.05)
    assert bf16["on_cell_gradcam"].between(0, 1).all()


def test_a_model_failure_becomes_error_rows_not_a_crash(tiny_model_dir, real_data_dir, tmp_path):
    cfg = score_config(tiny_model_dir, tmp_path, tmp_path / "out")
    scorer = core.Scorer(cfg, str(tmp_path / "out"), "run", lambda n, batch: n)
    decoded = _decoded(real_images(real_data_dir, 1), size=32)       # wrong size: the model path fails
    decoded["pixels"] = np.zeros((4, 3, 3, 3), np.uint8)
    rows = scorer(decoded).to_pandas()
    assert (rows["status"] == "error").all() and (rows["error_type"] == "model_error").all()
    assert all(path in err for path, err in zip(rows["path"], rows["error"]))


def test_a_broken_gpu_context_ends_the_replica_while_out_of_memory_stays_error_rows(tiny_model_dir, real_data_dir,
                                                                                     tmp_path):
    """CUDA's sticky errors (injected: no GPU here) leave the process's context unusable: writing them as
    model_error rows turned the rest of the night into error rows and an exit 0. They raise
    DeviceBroken, whose Ray wrapper ends the replica for a fresh one; an out-of-memory error stays a
    batch of model_error rows, as the next batch may fit."""
    cfg = score_config(tiny_model_dir, tmp_path, tmp_path / "out")
    scorer = core.Scorer(cfg, str(tmp_path / "out"), "run", lambda n, batch: n)
    decoded = _decoded(real_images(real_data_dir, 1))
    for sticky in (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
                   RuntimeError("CUDA error: device-side assert triggered")):
        def fails(*args, err=sticky):
            raise err
        scorer.first_pass = fails
        with pytest.raises(core.DeviceBroken, match="illegal memory access|device-side assert"):
            scorer(decoded)
        # the batch's last try (ray_data.DEVICE_TRIES): its rows, so a faulty GPU cannot loop for ever
        rows = scorer(decoded, device_may_be_broken=True).to_pandas()
        assert (rows["error_type"] == "model_error").all() and rows["error"].str.contains("CUDA error").all()

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    scorer.first_pass = out_of_memory
    rows = scorer(decoded).to_pandas()
    assert (rows["error_type"] == "model_error").all() and rows["error"].str.contains("CUDA out of memory").all()


def test_a_batch_whose_budgeted_method_fails_gives_its_budget_back(tiny_model_dir, real_data_dir, tmp_path):
    """Error rows spend no budget: the batch's grant goes back to the job's ledger (a rerun would
    count the same from the rows), so later images still get the budgeted method."""
    cfg = score_config(tiny_model_dir, tmp_path, tmp_path / "out",
                       explain={"heatmaps": "files", "budget": {"methods": ["lime"], "sample_fraction": 1.0}})
    ledger = Ledger(budget_cap=4)
    scorer = core.Scorer(cfg, str(tmp_path / "out"), "run", ledger.reserve)
    decoded = _decoded(real_images(real_data_dir, 2), size=32)
    explain = scorer.budgeted["lime"].explain

    def fails(*args):
        raise RuntimeError("LIME ran out of something")
    scorer.budgeted["lime"].explain = fails
    rows = scorer(decoded).to_pandas()
    assert (rows["error_type"] == "model_error").all() and ledger.budget_left == 4
    scorer.budgeted["lime"].explain = explain
    rows = scorer(decoded).to_pandas()
    assert (rows["status"] == "ok").all() and len(rows) == 8
    assert (rows["budget_reason"] == "over_cap").sum() == 4 and rows["heatmap_lime"].notna().sum() == 4
    assert ledger.budget_left == 0


def test_an_image_whose_model_output_is_nan_is_an_error_row_not_a_confident_class_0(tiny_model_dir, real_data_dir,
                                                                                    tmp_path):
    """softmax(NaN).max() is class 0 at confidence NaN, and NaN < uncertain_below is false: the image
    read as a confident first class and missed the morning list. The NaN is injected (one image's
    logits), the rest of its batch is scored as usual. Nothing of the bad image is written: with
    loose files, no heatmap or overlay file names it (an orphan a cleanup could never attribute)."""
    out = tmp_path / "out"
    cfg = score_config(tiny_model_dir, tmp_path, out, explain={"heatmaps": "files", "overlays": True})
    scorer = core.Scorer(cfg, str(out), "run", lambda n, batch: n)
    first_pass = scorer.first_pass

    def one_nan(x):
        explanations, logits = first_pass(x)
        logits = logits.clone()
        logits[1] = float("nan")
        return explanations, logits

    scorer.first_pass = one_nan
    rows = scorer(_decoded(real_images(real_data_dir, 1))).to_pandas()
    bad, good = rows.iloc[1], rows.drop(index=1)
    assert (bad["status"], bad["error_type"]) == ("error", "non_finite_output") and bad["path"] in bad["error"]
    assert pd.isna(bad["predicted_class"]) and pd.isna(bad["confidence"]) and pd.isna(bad["heatmap_gradcam"])
    assert all(pd.isna(bad[c]) for c in rows.columns if c.startswith(("prob_", "cal_prob_", "raw_max_", "on_cell_")))
    assert (good["status"] == "ok").all() and good["confidence"].notna().all()
    written = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert written and not [name for name in written if bad["sha256"] in name], written
    assert all(any(sha in name for name in written) for sha in good["sha256"])


def test_faithfulness_is_scored_on_uncertain_images_and_a_content_fixed_sample():
    from allcluster.score.budget import sha_fraction

    shas = [f"{k:x}" * 64 for k in range(16)]
    confidence = np.array([0.3, 0.9] * 8)
    cfg = from_dict(ScoreConfig, {"uncertain_below": 0.6, "explain": {"faithfulness_sample": 0.5}}, "t")
    chosen = core.faithfulness_rows(confidence, [s[:64] for s in shas], cfg)
    assert chosen == [j for j in range(16) if confidence[j] < 0.6 or sha_fraction(shas[j][:64]) < 0.5]
    assert set(range(0, 16, 2)) <= set(chosen) and len(chosen) < 16, "every uncertain one, not every one"
    everyone = from_dict(ScoreConfig, {"explain": {"faithfulness_sample": 1.0}}, "t")
    assert core.faithfulness_rows(confidence, [s[:64] for s in shas], everyone) == list(range(16))


def test_rows_outside_the_faithfulness_selection_keep_their_maps_without_a_score(tiny_model_dir, real_data_dir, tmp_path):
    paths = real_images(real_data_dir, 1)
    cfg = score_config(tiny_model_dir, tmp_path, tmp_path / "out", uncertain_below=0.0,
                       explain={"budget": {"methods": []}, "faithfulness_sample": 0.0})
    rows = scored_rows(cfg, _decoded(paths))
    assert (rows["status"] == "ok").all() and rows["heatmap_gradcam"].notna().all()
    assert rows["on_cell_gradcam"].notna().all() and rows["faith_drop_gradcam"].isna().all()


def test_faithfulness_with_known_probabilities_equals_the_full_computation():
    from allcluster.models import build_model
    from allcluster.models.registry import HeadSpec
    from allcluster.xai.faithfulness import faithfulness

    torch.manual_seed(0)
    model = build_model("allnet", 4, HeadSpec((16,), 0, 0)).eval()
    x, maps, targets = torch.randn(3, 3, 48, 48), torch.rand(3, 48, 48), torch.tensor([0, 1, 3])
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    full, reused = faithfulness(model, x, maps, targets), faithfulness(model, x, maps, targets, probs=probs)
    for key in ("confidence", "drop", "kept"):
        torch.testing.assert_close(full[key], reused[key], atol=1e-5, rtol=1e-4)


# ---- a real Ray Data job over real images and the zoo ----------------------------------------------
def build_dump(root: Path, real_data_dir: Path, outside: Path) -> dict:
    """Real images in class folders, byte-identical copies, odd names and every broken input."""
    images = real_images(real_data_dir, 4)
    for p in images[:-1]:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    odd = root / "odd names"
    odd.mkdir()
    shutil.copy(images[-1], odd / "zellé 1 ünïcode.jpg")
    copies = [root / "copies" / "same-as-first.jpg", root / "copies" / "again.jpg"]
    copies[0].parent.mkdir()
    for copy in copies:
        shutil.copy(images[0], copy)
    bad = imagezoo.bad_files(root / "zoo" / "bad")
    good = imagezoo.good_files(root / "zoo" / "good")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "private.jpg").write_bytes(imagezoo.jpeg_bytes(7))
    links = {"outside_root": root / "zoo" / "leaves-root.jpg", "symlink_loop": root / "zoo" / "loop.jpg"}
    links["outside_root"].symlink_to(outside / "private.jpg")
    links["symlink_loop"].symlink_to(links["symlink_loop"])
    os.mkfifo(root / "zoo" / "pipe.jpg")
    return {"first": root / images[0].parent.name / images[0].name, "copies": copies, "bad": bad, "good": good,
            "links": links, "fifo": root / "zoo" / "pipe.jpg", "odd": odd / "zellé 1 ünïcode.jpg"}


@pytest.fixture(scope="module")
def zoo_job(ray_local, tiny_model_dir, real_data_dir, tmp_path_factory):
    from allcluster.cli import main

    base = tmp_path_factory.mktemp("score-job")
    root, out = base / "dump", base / "out"
    dump = build_dump(root, real_data_dir, base / "outside")
    before = tree_fingerprint(root)
    rc = main(["score", "--config", str(CI_TINY), "--model", str(tiny_model_dir), "--input", str(root),
               "--out", str(out)])
    rows = pd.read_parquet(out / "rows")
    return {"rc": rc, "rows": rows.set_index("path", drop=False), "out": out, "root": root, "dump": dump,
            "before": before, "summary": json.loads((out / "summary.json").read_text()), "model": tiny_model_dir}


@pytest.mark.ray
def test_what_an_error_row_does_not_know_is_null_not_a_placeholder(zoo_job):
    """README: columns absent for a row are null (a -1 width or size would count in avg() and sum())."""
    rows = zoo_job["rows"]
    errors = rows[rows["status"] == "error"]
    assert len(errors) >= 8 and errors["width"].isna().all() and errors["height"].isna().all()
    assert (rows["size_bytes"].dropna() >= 0).all() and (rows["sha256"].dropna() != "").all()
    truncated = errors[errors["error_type"] == "truncated"].iloc[0]
    assert truncated["size_bytes"] == os.path.getsize(truncated["path"]) and len(truncated["sha256"]) == 64, \
        "a file read but not decoded keeps its size and hash"
    unread = errors[errors["error_type"] == "empty_file"].iloc[0]
    assert pd.isna(unread["sha256"]) and pd.isna(unread["size_bytes"])


@pytest.mark.ray
def test_every_entry_of_the_dump_gets_exactly_one_row_and_the_job_exits_0(zoo_job):
    rows, root = zoo_job["rows"], zoo_job["root"]
    entries = {str(p) for p in root.rglob("*") if p.is_file() or p.is_symlink() or p.is_fifo()}
    assert zoo_job["rc"] == 0
    assert rows["path"].is_unique and set(rows["path"]) == entries
    summary = zoo_job["summary"]
    assert summary["rows"] == len(entries) and summary["errors"] == int((rows["status"] == "error").sum())
    assert summary["per_class"] == rows.loc[rows["status"] == "ok", "predicted_class"].value_counts().to_dict()
    assert summary["errors_by_type"] == rows.loc[rows["status"] == "error", "error_type"].value_counts().to_dict()
    assert summary["seconds_to_first_row"] > 0, "start-up is measured"


@pytest.mark.ray
def test_corrupt_zoo_files_become_one_error_row_each_and_odd_valid_files_are_scored(zoo_job):
    rows, dump = zoo_job["rows"], zoo_job["dump"]
    for name, path in dump["bad"].items():
        row = rows.loc[str(path)]
        assert (row["status"], row["error_type"]) == ("error", imagezoo.EXPECTED_ERROR[name]), name
        assert str(path) in row["error"] and pd.isna(row["predicted_class"])
    for kind, path in dump["links"].items():
        assert (rows.loc[str(path), "status"], rows.loc[str(path), "error_type"]) == ("error", kind)
    assert rows.loc[str(dump["fifo"]), "error_type"] == "not_a_file"
    for name, path in [*dump["good"].items(), ("unicode and spaces", dump["odd"])]:   # CMYK, 16-bit, RGBA ...
        row = rows.loc[str(path)]
        assert row["status"] == "ok" and row["predicted_class"] in ("Benign", "Early", "Pre", "Pro"), name
        assert load_heatmap(zoo_job["out"] / row["heatmap_gradcam"], row["sha256"], "gradcam").shape == (64, 64), name


def test_a_file_without_read_permission_is_an_unreadable_error_row(tmp_path):
    """As an ordinary user (root reads anything, so this runs the stage as 'nobody' where possible)."""
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(imagezoo.jpeg_bytes())
    locked.chmod(0)
    code = ("import sys, json, numpy as np; from allcluster.score.reading import read_decode; from allcluster.score.ledger import Ledger; "
            "o = read_decode({'path': np.array([sys.argv[1]], dtype=object)}, 32, False, 0.1, 10**7, Ledger(0).claim); "
            "print(json.dumps([o['status'][0], o['error_type'][0], o['error'][0]]))")
    command = [sys.executable, "-c", code, str(locked)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot drop privileges to test permissions")
        tmp_path.chmod(0o755)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    status, kind, message = json.loads(done.stdout)
    assert (status, kind) == ("error", "unreadable") and str(locked) in message and "permission" in message.lower()


@pytest.mark.ray
def test_byte_identical_files_are_computed_once_and_each_gets_its_row(zoo_job):
    rows, dump = zoo_job["rows"], zoo_job["dump"]
    # which copy computes is whichever read task claims the content first (tasks run in parallel): one
    same = rows.loc[[str(p) for p in (dump["first"], *dump["copies"])]]
    (owner,) = same.index[same["duplicate_of"] == ""]
    first = rows.loc[owner]
    assert first["t_model_ms"] > 0
    for copy in same.index.drop(owner):
        row = rows.loc[copy]
        assert row["duplicate_of"] == owner and row["sha256"] == first["sha256"]
        assert pd.isna(row["t_model_ms"]) and row["t_decode_ms"] == 0, "a duplicate must not be recomputed"
        for column in ("predicted_class", "confidence", "prob_Pre", "heatmap_gradcam", "faith_drop_gradcam"):
            assert row[column] == first[column], column
    computed = rows[(rows["status"] == "ok") & (rows["duplicate_of"] == "")]
    assert computed["sha256"].is_unique
    maps = pq.read_table(zoo_job["out"] / "heatmaps", columns=["sha256", "method"]).to_pandas()
    gradcam = maps.loc[maps["method"] == "gradcam", "sha256"]
    assert gradcam.is_unique and set(gradcam) == set(computed["sha256"]), "each content's map stored once"


@pytest.mark.ray
def test_heatmaps_are_8bit_maps_packed_per_shard_and_inputs_are_never_written(zoo_job):
    from allcluster.score.heatmaps import find_heatmap

    rows, out = zoo_job["rows"], zoo_job["out"]
    ok = rows[rows["status"] == "ok"]
    shards = {p.name for p in (out / "rows").glob("*.parquet")}
    packs = {p.name for p in (out / "heatmaps").iterdir()}
    assert packs and packs <= shards, "one pack per row shard at most: files grow with shards, not images"
    for sha, rel in zip(ok["sha256"], ok["heatmap_gradcam"]):
        assert rel.startswith("heatmaps/part-") and Path(rel).name in packs
        image = Image.open(io.BytesIO(find_heatmap(out, sha, "gradcam")))
        assert image.mode == "L" and image.size == (64, 64)
        assert np.array_equal(np.asarray(image), load_heatmap(out / rel, sha, "gradcam"))
    assert tree_fingerprint(zoo_job["root"]) == zoo_job["before"]
    assert not list(zoo_job["root"].rglob("*.png.tmp")) and not list(zoo_job["root"].rglob("heatmaps"))


@pytest.mark.ray
def test_budgeted_lime_runs_only_on_selected_images_within_the_cap(zoo_job):
    rows = zoo_job["rows"]
    own = rows[(rows["status"] == "ok") & (rows["duplicate_of"] == "")]
    explained = own[own["heatmap_lime"].notna()]
    assert 1 <= len(explained) <= 4, "ci_tiny caps LIME at 4 images"
    assert (explained["budget_reason"] == "low_confidence").all() and (explained["confidence"] < 0.6).all()
    assert (explained["explained_by"] == "gradcam,lime").all()
    skipped = own[own["heatmap_lime"].isna()]
    assert set(skipped["budget_reason"]) <= {"", "over_cap"}
    assert zoo_job["summary"]["budget_explained"] == len(explained)


@pytest.mark.ray
def test_rows_carry_provenance_and_read_without_allcluster(zoo_job):
    rows = zoo_job["rows"]
    card = json.loads((zoo_job["model"] / "model_card.json").read_text())
    assert (rows["model_sha256"] == card["weights_sha256"]).all() and rows["run_id"].nunique() == 1
    for column in ("torch_version", "timm_version", "ray_version", "allcluster_version", "config_hash"):
        assert rows[column].str.len().gt(0).all(), column
    code = ("import sys, pyarrow.dataset as ds; t = ds.dataset(sys.argv[1], format='parquet').to_table(); "
            "assert 'allcluster' not in sys.modules; print(t.num_rows, t.schema.field('confidence').type)")
    done = subprocess.run([sys.executable, "-I", "-c", code, str(zoo_job["out"] / "rows")], capture_output=True,
                          text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(rows)), "float"]


@pytest.mark.ray
def test_rerunning_a_finished_job_scores_only_its_transient_errors_again(zoo_job):
    from allcluster.cli import main
    from allcluster.data.decode import TRANSIENT_ERRORS

    before = pd.read_parquet(zoo_job["out"] / "rows")
    transient = before[before["error_type"].isin(sorted(TRANSIENT_ERRORS))]
    assert set(transient["error_type"]) == {"empty_file", "truncated"}
    rc = main(["score", "--config", str(CI_TINY), "--model", str(zoo_job["model"]), "--input",
               str(zoo_job["root"]), "--out", str(zoo_job["out"])])
    assert rc == 0
    assert json.loads((zoo_job["out"] / "summary.json").read_text())["run_rows"] == len(transient)
    after = pd.read_parquet(zoo_job["out"] / "rows")
    assert after["path"].is_unique and sorted(after["path"]) == sorted(before["path"])
    rescored = after[after["run_id"] != before["run_id"].iloc[0]]
    assert sorted(rescored["path"]) == sorted(transient["path"]), "final rows are kept as they were"


def test_dry_run_lists_the_job_and_estimates_from_measured_costs(tiny_model_dir, real_data_dir, tmp_path, capsys):
    from allcluster.cli import main
    from allcluster.score.estimate import STARTUP_PER_COLD_START

    assert main(["score", "--config", str(CI_TINY), "--model", str(tiny_model_dir), "--input", str(real_data_dir),
                 "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    numbers = json.loads(text[text.index("{"):])
    assert numbers["to_do"] == numbers["inputs"] == len(list(real_data_dir.rglob("*.jpg")))
    assert numbers["decode_ms"] > 0 and numbers["every_image_ms"] > 0 and numbers["budget_ms"] > 0
    assert 0 < numbers["budget_selected"] <= 4 and numbers["estimated_total_s"] > 0
    assert numbers["startup_from"] == "probe" and "of which start-up" in text
    assert numbers["estimated_startup_s"] > STARTUP_PER_COLD_START * numbers["cold_start_s"] > 0
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"
    # an array task's dry run estimates its own part, with its share of the budget cap
    part = len(list_inputs(real_data_dir).part(Shard(1, 3)))
    assert main(["score", "--config", str(CI_TINY), "--model", str(tiny_model_dir), "--input", str(real_data_dir),
                 "--out", str(tmp_path / "out"), "--dry-run", "--shard", "1/3"]) == 0
    text = capsys.readouterr().out
    numbers = json.loads(text[text.index("{"):])
    assert numbers["inputs"] == numbers["to_do"] == part < len(list(real_data_dir.rglob("*.jpg")))
    assert numbers["budget_cap_left"] == Shard(1, 3).share(from_dict(ScoreConfig, read_yaml(CI_TINY)).explain.budget.max_images)
    check_job_settings(tmp_path / "other", {"model_sha256": "another model"})
    assert main(["score", "--config", str(CI_TINY), "--model", str(tiny_model_dir), "--input", str(real_data_dir),
                 "--out", str(tmp_path / "other"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "already holds rows scored with other settings" in err and "model_sha256: 'another model' -> " in err


def test_dry_run_arithmetic_adds_cpu_times_overlaps_gpu_times_and_counts_start_up():
    from allcluster.score.estimate import CPU_SHARED_SLOWDOWN, job_seconds

    costs = {"every_image_ms": 40.0, "budget_ms": 1000.0, "decode_ms": 10.0}
    cpu = job_seconds(1000, 10, costs, {"device": "cpu", "size": 1, "num_cpus": 1.0}, 2, 0.25, 30.0)
    # model 1000 x 40 ms + 10 x 1 s = 50 s, slowed on shared cores; decode 10 s of CPU over 2 cores
    # = 5 s; + 30 s start-up
    model_s = 50.0 * CPU_SHARED_SLOWDOWN
    assert cpu == {"estimated_startup_s": 30.0, "estimated_model_s": round(model_s, 1), "estimated_decode_s": 5.0,
                   "estimated_total_s": round(30.0 + model_s + 5.0, 1)}
    gpu = job_seconds(1000, 10, costs, {"device": "cuda", "size": 2, "num_cpus": 1.0}, 10, 0.5, 30.0)
    # two replicas: 25 s of model time; decode on (10 - 2) / 0.5 = 16 parallel tasks: 0.6 s; overlapping
    assert gpu == {"estimated_startup_s": 30.0, "estimated_model_s": 25.0, "estimated_decode_s": 0.6,
                   "estimated_total_s": 55.0}


def test_a_dry_run_takes_start_up_from_the_last_run_into_the_same_out_else_from_its_probe(tmp_path):
    from allcluster.score.estimate import STARTUP_PER_COLD_START, earlier_startup, fresh_startup_s

    # a fresh OUT: the driver's own 0.5 s, then Ray, Ray Data and the replica in probe cold starts
    fresh = fresh_startup_s(0.5, 2.0)
    assert fresh == pytest.approx(0.5 + 2.0 * STARTUP_PER_COLD_START)
    assert earlier_startup(tmp_path, fresh) == (fresh, "probe")
    (tmp_path / "summary.json").write_text(json.dumps({"rows": 3, "seconds_to_first_row": 41.5}))
    assert earlier_startup(tmp_path, fresh) == (41.5, "summary.json")


class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_progress_updates_in_place_on_a_terminal_and_prints_lines_in_a_log(tty):
    from allcluster.score.output import Progress

    stream = _Stream(tty)
    progress = Progress(total=10, interval=1e-9, stream=stream)
    progress.update(4, 1)
    progress.update(6, 0)
    progress.show(final=True)
    assert "10/10 (100.0%)" in stream.text and "errors 1" in stream.text and "img/s" in stream.text
    assert "ETA 00:00:00" in stream.text and "4/10 (40.0%)" in stream.text
    if tty:
        assert stream.text.count("\r") == 3 and stream.text.count("\n") == 1
    else:
        assert "\r" not in stream.text and stream.text.count("\n") == 3


def test_the_packed_store_writes_one_pack_per_shard_that_holds_every_map_once(tiny_model_dir, real_data_dir,
                                                                              tmp_path):
    from allcluster.score.heatmaps import find_heatmap

    paths = real_images(real_data_dir, 3)
    out = tmp_path / "out"
    cfg = score_config(tiny_model_dir, tmp_path, out, explain={"overlays": True, "methods": ["gradcam", "gradcam++"],
                                                              "budget": {"methods": []}})
    first, second = scored_rows(cfg, _decoded(paths[:6]), "r1"), scored_rows(cfg, _decoded(paths[6:]), "r2")
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and p.parent.name == "heatmaps") == \
        ["part-r1-00000.parquet", "part-r2-00000.parquet"], "one pack per row shard, no loose files"
    assert not list(out.rglob("*.png")) and not list(out.rglob("*.jpg"))
    pack = pq.read_table(out / "heatmaps" / "part-r1-00000.parquet").to_pandas()
    assert sorted(zip(pack["sha256"], pack["method"])) == sorted((s, m) for s in first["sha256"] for m in ("gradcam", "gradcampp"))
    assert pack["overlay_jpg"].notna().all() and list(pack["sha256"]) == sorted(pack["sha256"])
    for row in pd.concat([first, second]).itertuples():
        by_row = load_heatmap(out / row.heatmap_gradcampp, row.sha256, "gradcam++")
        by_sha = find_heatmap(out, row.sha256, "gradcam++")
        assert by_row.shape == (64, 64) and by_row.dtype == np.uint8
        assert np.array_equal(by_row, np.asarray(Image.open(io.BytesIO(by_sha))))
    with pytest.raises(FileNotFoundError, match="no gradcam map"):
        find_heatmap(out, "0" * 64, "gradcam")
    text = (REPO / "README.md").read_text()
    recipe = text[text.index("```python", text.index("**Heatmaps at archive scale.**")) + len("```python"):]
    scope = {"OUT": str(out), "IMAGE": str(first["path"].iloc[0])}
    exec(recipe[:recipe.index("```")], scope)                  # the README's pandas recipe for one map
    assert scope["png"] == find_heatmap(out, first["sha256"].iloc[0], "gradcam")
    # a damaged pack (a copy cut short): an OSError naming it, which `explain --scores` and the report
    # turn into one image's note; by sha256, the other packs are still searched
    damaged = out / "heatmaps" / "part-r1-00000.parquet"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(OSError, match="part-r1-00000.parquet: not a readable heatmap pack"):
        load_heatmap(damaged, first["sha256"].iloc[0], "gradcam")
    assert find_heatmap(out, second["sha256"].iloc[0], "gradcam")
    with pytest.raises(OSError, match="not a readable heatmap pack"):
        find_heatmap(out, first["sha256"].iloc[0], "gradcam")


def test_a_stored_map_that_is_not_a_png_is_an_oserror_naming_it(tmp_path):
    broken = tmp_path / "ab" / "ab12.gradcam.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG but cut short")
    with pytest.raises(OSError, match=r"ab12.gradcam.png: the gradcam map of sha256 ab12 is not a readable PNG"):
        load_heatmap(broken, "ab12", "gradcam")


def test_a_scoring_outputs_model_record_reads_typed_with_the_cards_defaults(tiny_model_dir, tmp_path):
    from allcluster.models.card import CardError, ModelCard, ModelInfo

    card = ModelCard.read(tiny_model_dir).replace(roi_crop=True, roi_margin=0.25)
    card.write_model_info(tmp_path)
    info = ModelInfo.read(tmp_path)
    assert (info.input_size, info.classes, info.roi_crop, info.roi_margin, info.cam_layer, info.weights_sha256) == \
        (card.input_size, card.classes, True, 0.25, card.cam_layer, card.weights_sha256)
    (tmp_path / "model.json").write_text(json.dumps({"input_size": 64, "newer_key": 1}))   # older/newer writers
    assert ModelInfo.read(tmp_path) == ModelInfo(input_size=64)
    assert (ModelInfo().roi_crop, ModelInfo().roi_margin) == (ModelCard.roi_crop, ModelCard.roi_margin)
    assert ModelInfo.read(tmp_path / "gone") == ModelInfo()
    (tmp_path / "model.json").write_text("[1, 2]")
    with pytest.raises(CardError, match="model.json: not a model record"):
        ModelInfo.read(tmp_path)


def test_explain_shows_a_scoring_jobs_stored_maps_found_by_content(tiny_model_dir, real_data_dir, tmp_path, capsys):
    from allcluster.cli import main
    from allcluster.models.card import ModelCard

    paths = real_images(real_data_dir, 1)
    out = tmp_path / "out"
    cfg = score_config(tiny_model_dir, tmp_path, out, explain={"budget": {"methods": []}})
    scored_rows(cfg, _decoded(paths[:2]))
    ModelCard.read(tiny_model_dir).write_model_info(out)
    moved = tmp_path / "elsewhere" / os.fsdecode(b"renamed \xe9.jpg")   # found by content, not by name; not UTF-8
    moved.parent.mkdir()
    shutil.copy(paths[0], moved)
    panels = tmp_path / "panels"
    assert main(["explain", "--scores", str(out), str(moved), str(paths[3]), "--out", str(panels)]) == 1
    printed = capsys.readouterr().out
    assert "not_scored" in printed and str(paths[3]) in printed, "an image the job never scored is an error naming it"
    panel, = panels.glob("renamed *.explain.png")
    assert Image.open(panel).size[0] > Image.open(panel).size[1] * 1.5, "the image and the stored map side by side"
    assert main(["explain", str(moved)]) == 2 and "give --model" in capsys.readouterr().err
    from allcluster.score.rows import methods_of

    stored = ",".join(methods_of(pq.read_schema(next((out / "rows").glob("*.parquet")))))
    assert main(["explain", "--scores", str(out), str(moved), "--out", str(panels), "--methods", stored]) == 0
    capsys.readouterr()
    for option, refusal in ((["--methods", "lime"], f"stores no lime maps; it stores: {stored.replace(',', ', ')}"),
                            (["--lime-samples", "50"], "--lime-samples applies to --model only")):
        assert main(["explain", "--scores", str(out), str(moved), "--out", str(panels), *option]) == 2
        assert refusal in capsys.readouterr().err, option
    shard = next((out / "rows").glob("*.parquet"))
    (out / "rows" / "part-a-copy.parquet").write_bytes(shard.read_bytes()[:200])       # a copy cut short
    assert main(["explain", "--scores", str(out), str(moved), "--out", str(panels)]) == 0
    assert f"1 of {out}'s row shards are no readable Parquet (e.g. {out / 'rows' / 'part-a-copy.parquet'})" \
        in capsys.readouterr().err


def test_a_pack_that_cannot_be_written_turns_its_rows_into_transient_write_errors(tiny_model_dir, real_data_dir,
                                                                                  tmp_path):
    from allcluster.data.decode import TRANSIENT_ERRORS

    out = tmp_path / "out"
    out.mkdir()
    (out / "heatmaps").write_text("a file where the heatmap folder goes")
    cfg = score_config(tiny_model_dir, tmp_path, out, explain={"budget": {"methods": []}})
    rows = scored_rows(cfg, _decoded(real_images(real_data_dir, 1)))
    assert (rows["status"] == "error").all() and (rows["error_type"] == "write_error").all()
    assert rows["heatmap_gradcam"].isna().all() and "write_error" in TRANSIENT_ERRORS
    assert all(path in err and "heatmaps/part-run-00000.parquet" in err for path, err in zip(rows["path"], rows["error"]))


def test_overlays_are_written_only_when_asked(tiny_model_dir, real_data_dir, tmp_path):
    paths = real_images(real_data_dir, 1)
    for overlays in (False, True):
        out = tmp_path / f"overlays-{overlays}"
        cfg = score_config(tiny_model_dir, tmp_path, out, explain={"overlays": overlays, "budget": {"methods": []},
                                                                  "heatmaps": "files"})
        rows = scored_rows(cfg, _decoded(paths))
        written = sorted(out.rglob("*.jpg"))
        if not overlays:
            assert not written and len(list(out.rglob("*.png"))) == len(paths)
            continue
        expected = [out / rel.replace("heatmaps/", "overlays/").replace(".png", ".jpg") for rel in rows["heatmap_gradcam"]]
        assert written == sorted(expected)
        overlay = np.asarray(Image.open(expected[0]))
        assert overlay.shape == (64, 64, 3) and overlay.std() > 0


def test_a_duplicate_takes_its_first_copys_results_but_keeps_its_own_input_columns(tmp_path):

    from allcluster.score.output import ShardWriter, resolve_duplicates
    from allcluster.score.rows import empty_columns, row_schema

    schema = row_schema(["A", "B"], ["gradcam"], ["ward"])
    cols = empty_columns(schema, 5)
    cols.update(path=["first.jpg", "bad.jpg", "copy.jpg", "orphan.jpg", "bad copy.jpg"],
                sha256=["aa" * 32, "cc" * 32, "aa" * 32, "bb" * 32, "cc" * 32],
                status=["ok", "error", "ok", "ok", "ok"], duplicate_of=["", "", "first.jpg", "gone.jpg", "bad.jpg"],
                ward=["W1", "W0", "W2", "W3", "W4"], predicted_class=["B", None, None, None, None],
                error_type=["", "not_an_image", "", "", ""], error=["", "bad.jpg: not a recognised image format", "", "", ""],
                confidence=[0.9, None, None, None, None], t_model_ms=[5.0, None, None, None, None])
    table = pa.Table.from_pydict(cols, schema=schema)
    writer = ShardWriter(tmp_path, schema, "run", rows_per_shard=100, flush_seconds=60)
    writer.add(table.slice(0, 2))
    writer.flush()
    filled = resolve_duplicates(tmp_path, table.slice(2), ["ward"]).to_pylist()
    copy, orphan, bad_copy = filled
    assert (copy["path"], copy["ward"], copy["duplicate_of"]) == ("copy.jpg", "W2", "first.jpg")
    assert (copy["predicted_class"], copy["confidence"], copy["t_model_ms"]) == ("B", pytest.approx(0.9), None)
    assert (orphan["status"], orphan["error_type"]) == ("error", "duplicate_unresolved")
    assert (bad_copy["status"], bad_copy["error_type"]) == ("error", "not_an_image")
    assert bad_copy["error"].startswith("bad copy.jpg: same bytes as bad.jpg, whose row says: bad.jpg: not a"), \
        "an error row names its own file first"


def test_held_back_duplicates_are_resolved_and_written_a_pass_at_a_time(tmp_path, monkeypatch):
    """A dump where half the files are copies holds millions of duplicates until the end of the run:
    resolved all at once, as Python objects, they could take the driver's memory."""
    from allcluster.score import output
    from allcluster.score.rows import empty_columns, row_schema

    schema = row_schema(["A", "B"], [], [])
    firsts = empty_columns(schema, 2)
    firsts.update(path=["a.jpg", "b.jpg"], sha256=["aa" * 32, "bb" * 32], status=["ok", "ok"], duplicate_of=["", ""],
                  predicted_class=["A", "B"], run_id=["run"] * 2)
    copies = empty_columns(schema, 5)
    copies.update(path=[f"copy-{i}.jpg" for i in range(5)], sha256=["aa" * 32, "bb" * 32] * 2 + ["cc" * 32],
                  status=["ok"] * 5, duplicate_of=["a.jpg", "b.jpg"] * 2 + ["gone.jpg"], run_id=["run"] * 5)
    writer = output.ShardWriter(tmp_path, schema, "run", rows_per_shard=1000, flush_seconds=3600)
    writer.add(pa.Table.from_pydict(firsts, schema=schema))        # not flushed yet: the pass flushes first
    passes, resolve = [], output.resolve_duplicates

    def counted(out, waiting, extra=()):
        passes.append(waiting.num_rows)
        return resolve(out, waiting, extra)
    monkeypatch.setattr(output, "DUPLICATES_PER_PASS", 2)
    monkeypatch.setattr(output, "resolve_duplicates", counted)
    table = pa.Table.from_pydict(copies, schema=schema)
    output.write_resolved_duplicates(tmp_path, [table.slice(0, 3), table.slice(3)], writer)
    assert passes == [2, 2, 1], "the batches' tables are joined first: each pass reads the shards once"
    rows = pd.read_parquet(tmp_path / "rows").set_index("path")
    assert len(rows) == 7 and list(rows.loc[[f"copy-{i}.jpg" for i in range(4)], "predicted_class"]) == ["A", "B"] * 2
    assert rows.loc["copy-4.jpg", "error_type"] == "duplicate_unresolved"


def test_the_writer_counts_final_rows_apart_so_a_start_that_only_rewrites_transient_errors_made_no_progress(
        tmp_path):
    """A folder that stays unlistable (a file that stays unreadable) gets its error row again at every
    start: the Slurm script must not take that for progress (slurm/ray-cluster.sh stops a requeue loop)."""

    from allcluster.score.output import ShardWriter
    from allcluster.score.rows import empty_columns, row_schema

    schema = row_schema(["A", "B"], ["gradcam"], [])
    cols = empty_columns(schema, 4)
    cols.update(path=["locked/", "busy.jpg", "notes.txt", "cell.jpg"], status=["error", "error", "error", "ok"],
                error_type=["unlistable", "unreadable", "not_an_image", None], duplicate_of=[""] * 4)
    writer = ShardWriter(tmp_path, schema, "run", rows_per_shard=100, flush_seconds=60)
    writer.add(pa.Table.from_pydict(cols, schema=schema).slice(0, 2))
    writer.flush()
    assert (writer.written, writer.final) == (2, 0)
    writer.add(pa.Table.from_pydict(cols, schema=schema).slice(2))
    writer.flush()
    assert (writer.written, writer.final) == (4, 2)


def test_a_journal_that_finds_no_room_stops_the_run_and_keeps_its_whole_batches(tmp_path):
    """A full disk or quota met by the journal (appended at every batch, so often the first write to
    meet it) is a full output like any other: the writer raises ENOSPC naming the journal, and what the
    journal held stays for the rerun. Giving the journal up there let the run score on into memory
    that its next shard write (failing the same way) lost."""
    from allcluster.score.output import ShardWriter
    from allcluster.score.rows import row_schema

    schema = row_schema(["A", "B"], ["gradcam"], [])
    with tmpfs(tmp_path / "small", "size=64k") as mount:
        writer = ShardWriter(mount / "scored", schema, "run-1", rows_per_shard=10**6, flush_seconds=3600,
                             packed_methods=["gradcam"])
        added = 0
        with pytest.raises(OSError) as full:
            for batch in range(1000):
                writer.add(_journal_rows(schema, [f"{batch}/{i}-{'x' * 200}.jpg" for i in range(20)]))
                added += 1
        assert full.value.errno == errno.ENOSPC and full.value.filename == str(writer.journal_dir)
        kept = read_journal(writer.journal_dir / f"{writer.name()}.rows.arrows")
        assert added and kept is not None and kept.num_rows == 20 * added, "every whole batch stays journaled"


def test_an_empty_or_torn_shard_is_set_aside_and_its_files_are_scored_again(tmp_path, capsys):
    """A shard a crash or a cut copy left empty or torn made every later start die (ArrowInvalid, exit 1).
    The rows of the readable shards stand; a run moves the others to rows/.damaged/, naming them, and
    their files have no row, so they are scored again; a dry run only leaves them out."""
    from allcluster.score.output import RowsState, ShardWriter, rows_dataset
    from allcluster.score.rows import row_schema

    schema = row_schema(["A", "B"], ["gradcam"], [])
    for run, paths in (("run-1", ["a.jpg", "b.jpg"]), ("run-2", ["c.jpg"]), ("run-3", ["d.jpg"]), ("run-4", ["e.jpg"])):
        writer = ShardWriter(tmp_path, schema, run, rows_per_shard=100, flush_seconds=3600)
        writer.add(_journal_rows(schema, paths).drop_columns(["_png_gradcam"]))
        writer.flush()
    rows = tmp_path / "rows"
    empty, torn, zeroed = sorted(rows.glob("part-run-[234]-*.parquet"))
    empty.write_bytes(b"")
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    data = zeroed.read_bytes()                           # a crash's zero-filled pages, its length kept
    zeroed.write_bytes(data[:4] + bytes(len(data) // 2) + data[4 + len(data) // 2:])

    looked = RowsState.read(tmp_path)                   # a dry run: writes nothing
    assert sorted(looked.done_paths().to_pylist()) == ["a.jpg", "b.jpg"]
    assert empty.exists() and torn.exists() and zeroed.exists() and str(empty) in capsys.readouterr().err
    state = RowsState.read(tmp_path, set_aside=True)    # a run
    assert sorted(state.done_paths().to_pylist()) == ["a.jpg", "b.jpg"]
    err = capsys.readouterr().err
    assert f"{torn} is not a readable Parquet file" in err and "moved to" in err and "scored again" in err
    assert sorted(p.name for p in (rows / ".damaged").iterdir()) == sorted([empty.name, torn.name, zeroed.name])
    assert sorted(rows_dataset(tmp_path).to_table(columns=["path"])["path"].to_pylist()) == ["a.jpg", "b.jpg"]


def _journal_rows(schema, paths: list[str]) -> "pa.Table":

    from allcluster.score.rows import empty_columns

    cols = empty_columns(schema, len(paths))
    cols.update(path=paths, sha256=[hashlib.sha256(p.encode()).hexdigest() for p in paths], status=["ok"] * len(paths),
                duplicate_of=[""] * len(paths))
    table = pa.Table.from_pydict(cols, schema=schema)
    pngs = pa.array([b"\x89PNG map of " + p.encode() for p in paths], pa.binary())
    return table.append_column("_png_gradcam", pngs)


def test_rows_a_killed_driver_held_in_memory_are_recovered_from_its_journal_once(tmp_path):
    """The writer journals every batch it buffers; a driver that dies before its shard (SIGKILL, or Ray
    ending it when its raylet stops) leaves the journal, and the next run writes it as that shard,
    with its maps, under the dead run's id. A torn last batch is left out; a shard that was written
    is not written twice; an array task recovers only its own part's journal."""

    from allcluster.score.heatmaps import heatmap_png
    from allcluster.score.inputs import Shard
    from allcluster.score.output import RowsState, ShardWriter, recover_journals, with_journaled_rows
    from allcluster.score.rows import row_schema

    schema = row_schema(["A", "B"], ["gradcam"], [])
    writer = ShardWriter(tmp_path, schema, "run-1", rows_per_shard=100, flush_seconds=3600,
                         packed_methods=["gradcam"])
    writer.add(_journal_rows(schema, ["a.jpg", "b.jpg"]))
    writer.flush()                                                  # shard 0 written, its journal removed
    assert not list(tmp_path.glob("rows/.journal-*/*"))
    writer.add(_journal_rows(schema, ["c.jpg", "d.jpg"]))
    writer.add(_journal_rows(schema, ["e.jpg"]))
    journal = tmp_path / "rows" / ".journal-0-of-1" / "part-run-1-00001.parquet.rows.arrows"
    assert journal.is_file() and not (tmp_path / "rows" / "part-run-1-00001.parquet").exists()
    with open(journal, "r+b") as f:                              # killed while appending the last batch
        f.truncate(journal.stat().st_size - 40)
    part = ShardWriter(tmp_path, schema, "run-2", 100, 3600, ["gradcam"], Shard(1, 2))
    part.add(_journal_rows(schema, ["f.jpg"]))                      # an array task's, killed too
    del writer, part                                                # nothing flushes: the process died

    # --dry-run counts the journaled rows as done, as the run will once it has recovered them; writes nothing
    planned = with_journaled_rows(tmp_path, RowsState.read(tmp_path)).done_paths().to_pylist()
    assert sorted(planned) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "f.jpg"] and journal.is_file()
    assert recover_journals(tmp_path, Shard(0, 2)) == {}, "another part's journal is not ours"
    assert recover_journals(tmp_path, Shard(1, 2)) == {"part-run-2-00000.parquet": 1}, "its own, and only that"
    assert recover_journals(tmp_path, Shard()) == {"part-run-1-00001.parquet": 2}
    state = RowsState.read(tmp_path)
    assert sorted(state.done_paths().to_pylist()) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "f.jpg"]
    rows = pd.read_parquet(tmp_path / "rows").set_index("path")
    assert rows.loc["c.jpg", "heatmap_gradcam"] == "heatmaps/part-run-1-00001.parquet", "the shard it was journaled for"
    assert heatmap_png(tmp_path / rows.loc["d.jpg", "heatmap_gradcam"], rows.loc["d.jpg", "sha256"],
                       "gradcam") == b"\x89PNG map of d.jpg"
    assert not list((tmp_path / "rows").glob(".journal-*")), "recovered journals are removed"
    assert recover_journals(tmp_path, Shard()) == {}

    again = ShardWriter(tmp_path, schema, "run-3", 100, 3600, ["gradcam"])
    again.add(_journal_rows(schema, ["g.jpg"]))
    again.flush()                                     # killed after its shard, before the journal went:
    again.journal = None                              # the shard stands, and is not written a second time
    (tmp_path / "rows" / ".journal-0-of-1").mkdir()
    stale = tmp_path / "rows" / ".journal-0-of-1" / "part-run-3-00000.parquet.rows.arrows"
    with pa.OSFile(str(stale), "wb") as sink, pa.ipc.new_stream(sink, schema) as stream:
        stream.write_table(pq.read_table(tmp_path / "rows" / "part-run-3-00000.parquet"))
    assert recover_journals(tmp_path, Shard()) == {}
    assert pd.read_parquet(tmp_path / "rows")["path"].tolist().count("g.jpg") == 1 and not stale.exists()

    torn = ShardWriter(tmp_path, schema, "run-4", 100, 3600, ["gradcam"])
    torn.add(_journal_rows(schema, ["h.jpg", "i.jpg"]))
    maps = tmp_path / "rows" / ".journal-0-of-1" / "part-run-4-00000.parquet.maps.arrows"
    maps.write_bytes(maps.read_bytes()[:-200])      # its maps' stream torn (never flushed to the disk)
    assert recover_journals(tmp_path, Shard()) == {"part-run-4-00000.parquet": 2}
    lost = pd.read_parquet(tmp_path / "rows").set_index("path").loc[["h.jpg", "i.jpg"]]
    assert (lost["error_type"] == "write_error").all() and lost["heatmap_gradcam"].isna().all(), \
        "a row whose map the journal lost is scored again, never left pointing at nothing"


def test_a_journal_that_cannot_be_written_is_given_up_and_the_rows_still_reach_their_shard(tmp_path):
    from allcluster.score.output import ShardWriter
    from allcluster.score.rows import row_schema

    schema = row_schema(["A", "B"], ["gradcam"], [])
    writer = ShardWriter(tmp_path, schema, "run-1", 100, 3600, ["gradcam"])
    (tmp_path / "not-a-folder").write_text("")
    writer.journal_dir = tmp_path / "not-a-folder" / ".journal-0-of-1"       # mkdir fails: NotADirectoryError
    writer.add(_journal_rows(schema, ["a.jpg"]))
    writer.add(_journal_rows(schema, ["b.jpg"]))
    writer.flush()
    assert not writer.journaling and writer.written == 2
    assert sorted(pd.read_parquet(tmp_path / "rows")["path"]) == ["a.jpg", "b.jpg"]


def test_one_read_of_the_rows_gives_done_paths_budget_spent_and_the_rows_to_compact(tmp_path):

    from allcluster.score.output import RowsState, compact

    def shard(name, run, rows):
        keys = ["path", "status", "error_type", "duplicate_of", "budget_reason"]
        table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(keys)}).append_column("run_id", pa.array([run] * len(rows)))
        (tmp_path / "rows").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "rows" / name)

    shard("part-r1-00000.parquet", "r1", [("a", "ok", None, "", "low_confidence"), ("b", "error", "unreadable", "", ""),
                                          ("c", "error", "not_an_image", "", ""), ("d", "ok", None, "a", "low_confidence"),
                                          ("locked", "error", "unlistable", "", ""),
                                          ("e", "error", "write_error", "", "low_confidence")])   # its maps were lost
    shard("part-r2-00000.parquet", "r2", [("b", "ok", None, "", "sample")])
    state = RowsState.read(tmp_path)
    assert sorted(state.done_paths().to_pylist()) == ["a", "b", "c", "d"]
    assert sorted(state.done_paths(retry_errors=True).to_pylist()) == ["a", "b", "d"]
    assert state.budget_used() == 2, "a and the retried b; d is a duplicate of a; e's grant came back"
    assert state.superseded()[0].to_pylist() == ["b"]
    # a folder this run's listing still could not list keeps its row; one it listed loses it
    assert state.relisted(["locked"]).to_pylist() == [] and state.relisted([]).to_pylist() == ["locked"]
    assert compact(tmp_path, state=state, relisted=state.relisted([])) == 2
    after = RowsState.read(tmp_path)
    assert not len(after.superseded()[0]) and after.table.num_rows == 5
    assert "locked" not in after.table.column("path").to_pylist()
    assert sorted(after.done_paths().to_pylist()) == ["a", "b", "c", "d"]
    assert RowsState.read(tmp_path / "nothing-here").done_paths().to_pylist() == []


def _state_rows(out: Path, name: str, run: str, paths: list[str], status: str) -> None:
    """A shard of bookkeeping columns only: ``paths`` as ``ok`` rows or ``unreadable`` (transient) errors."""
    (out / "rows").mkdir(parents=True, exist_ok=True)
    n = len(paths)
    pq.write_table(pa.table({"path": paths, "run_id": [run] * n, "status": [status] * n,
                             "error_type": [None if status == "ok" else "unreadable"] * n,
                             "duplicate_of": [""] * n, "budget_reason": [""] * n}), out / "rows" / name)


def test_a_parts_summary_counts_a_retried_files_newer_row_only_while_another_part_still_runs(tmp_path):
    """Part 1 of 2 ends while part 0 still runs: part 0's retried file has its old (transient) row
    beside its new one until part 0 compacts. The summary part 1 writes must count the newer only."""
    from allcluster.score.output import summarize

    def shard(name: str, run: str, paths: list[str], status: str) -> None:
        n = len(paths)
        (tmp_path / "rows").mkdir(exist_ok=True)
        ok = status == "ok"
        pq.write_table(pa.table({
            "path": paths, "run_id": [run] * n, "status": [status] * n,
            "error_type": pa.array([None if ok else "unreadable"] * n, pa.string()), "duplicate_of": [""] * n,
            "budget_reason": [""] * n, "predicted_class": pa.array(["Pre" if ok else None] * n, pa.string()),
            "uncertain": pa.array([False if ok else None] * n, pa.bool_())}), tmp_path / "rows" / name)

    paths = [f"img-{i}.jpg" for i in range(6)]
    shard("part-r1-00000.parquet", "r1", paths, "error")               # an earlier whole run's
    for k in (0, 1):
        shard(f"part-r2-{k}-00000.parquet", f"r2-{k}", [p for p, mine in zip(paths, Shard(k, 2).holds(paths)) if mine], "ok")
    summary = summarize(tmp_path, 2.0, 3, Shard(1, 2))
    assert (summary["rows"], summary["ok"], summary["errors"]) == (6, 6, 0)
    assert summary["per_class"] == {"Pre": 6} and summary["errors_by_type"] == {}


def test_array_tasks_compacting_a_shard_they_share_at_once_leave_one_row_per_file(tmp_path):
    """A whole job's shard holds both array tasks' paths (transient errors); each task's rerun wrote
    its own paths' new rows and compacts at its start. Two real processes compact at once, the first
    paused (injected) between reading the shared shard and replacing it: the second must wait for it
    and read its rewrite, or it puts back the rows the first dropped. A shard left with no row stays
    as an empty file, so a task listing the rows at that moment never meets a vanished one."""
    paths = [f"img-{i:03d}.jpg" for i in range(60)]
    _state_rows(tmp_path, "part-r1-00000.parquet", "r1", paths, "error")            # the whole job's
    _state_rows(tmp_path, "part-r1-00001.parquet", "r1", paths[:1], "error")
    for k in (0, 1):
        _state_rows(tmp_path, f"part-r2-{k}-00000.parquet", f"r2-{k}",
                    [p for p, mine in zip(paths, Shard(k, 2).holds(paths)) if mine], "ok")
    paused = f"""
import time
from pathlib import Path
from allcluster.score import output
from allcluster.score.inputs import Shard
replace = output.replace_shard
def read_then_pause(path, table):
    print("READ", flush=True)
    time.sleep(3)
    replace(path, table)
output.replace_shard = read_then_pause
output.compact(Path({str(tmp_path)!r}), Shard(0, 2))
"""
    first = subprocess.Popen([sys.executable, "-c", paused], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert first.stdout.readline().strip() == "READ"
        from allcluster.score.output import compact

        assert compact(tmp_path, Shard(1, 2)) > 0
    finally:
        assert first.wait(timeout=60) == 0
    rows = pq.read_table(tmp_path / "rows").to_pandas()
    assert sorted(rows["path"]) == paths, "each file has exactly one row"
    assert set(rows["status"]) == {"ok"}
    assert pq.read_table(tmp_path / "rows" / "part-r1-00001.parquet").num_rows == 0


def test_a_run_started_after_the_clock_went_back_still_sorts_after_the_runs_before_it(tmp_path):
    """Compaction keeps each path's row of the newest run by run id, whose time is local: when daylight
    saving time ends (an hour repeats), or a requeue lands on a node whose clock lags, a rerun's id
    must still sort after the run it follows, or the older row (a transient error) would win."""
    import time as clock


    from allcluster.score.output import RowsState, compact, new_run_id

    ahead = clock.strftime("%Y%m%d-%H%M%S", clock.localtime(clock.time() + 1800))   # 01:50 of the first pass
    earlier = f"{ahead}-0000-0badc0de"
    (tmp_path / "rows").mkdir()
    rows = pa.table({"path": ["x.jpg", "y.jpg"], "status": ["error", "ok"], "error_type": ["unreadable", None],
                     "duplicate_of": ["", ""], "budget_reason": ["", ""], "run_id": [earlier] * 2})
    pq.write_table(rows, tmp_path / "rows" / f"part-{earlier}-00000.parquet")
    state = RowsState.read(tmp_path)
    assert state.newest_run() == earlier and RowsState.read(tmp_path / "none").newest_run() == ""

    rerun = new_run_id(after=state.newest_run())          # 01:20 of the second pass, by the clock
    assert rerun > earlier and rerun.startswith(clock.strftime("%Y%m%d-%H%M%S", clock.localtime(
        clock.mktime(clock.strptime(ahead, "%Y%m%d-%H%M%S")) + 1)))
    before = clock.strftime("%Y%m%d-%H%M%S")
    for past in ("20000101-000000-0000-00000000", "run-1"):     # older; or rows some other tool wrote
        assert before <= new_run_id(after=past)[:15] <= clock.strftime("%Y%m%d-%H%M%S"), past
    retried = rows.slice(0, 1).set_column(1, "status", pa.array(["ok"])).set_column(
        2, "error_type", pa.array([None], pa.string())).set_column(5, "run_id", pa.array([rerun]))
    pq.write_table(retried, tmp_path / "rows" / f"part-{rerun}-00000.parquet")
    assert compact(tmp_path) == 1
    kept = pq.read_table(tmp_path / "rows").to_pandas().set_index("path")
    assert kept.loc["x.jpg", "status"] == "ok" and kept.loc["x.jpg", "run_id"] == rerun, "the rerun's row wins"
    assert RowsState.read(tmp_path).newest_run() == rerun, "the newest over every shard"


def test_cpu_replicas_always_leave_a_decode_task_room_on_small_allocations():
    from allcluster.score.ray_data import actor_plan

    cfg = from_dict(ScoreConfig, {})
    for cpus in (1, 2, 3, 4, 16):
        plan = actor_plan(cfg, {"CPU": cpus})
        assert plan["size"] * plan["num_cpus"] + cfg.workers.decode_cpus <= cpus + 1e-9, (cpus, plan)
        assert plan["device"] == "cpu" and plan["threads"] >= 1
    assert actor_plan(cfg, {"CPU": 16})["num_cpus"] == cfg.workers.cpus_per_actor, "room to spare: as configured"
    gpu = actor_plan(cfg, {"CPU": 8, "GPU": 2})
    assert gpu["device"] == "cuda" and gpu["size"] == 2 and gpu["num_gpus"] == 1
    cuda = from_dict(ScoreConfig, {"workers": {"device": "cuda"}})
    assert actor_plan(cuda, {"CPU": 8, "GPU": 2})["device"] == "cuda"
    with pytest.raises(ConfigError, match="workers.device: 'cuda', but the Ray cluster has no GPU .*--gres=gpu"):
        actor_plan(cuda, {"CPU": 8})       # sbatch without --gres: refused, not a silent night on CPU


def test_the_scoring_driver_and_its_decode_tasks_never_import_torch():
    # The driver lists, writes and shows progress; the decode tasks read and decode. Importing torch
    # (and timm) there cost the command's start-up about 7 s on a 2-core node before Ray even began.
    code = ("import sys\n"
            "import allcluster.cli, allcluster.score.ray_data, allcluster.score.reading, allcluster.score.output\n"
            "from allcluster.score.config import ScoreConfig, check\n"
            "check(ScoreConfig(model='m', input='i', out='o'), 'test')\n"
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

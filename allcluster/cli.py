"""``allcluster``: the command line. Thin: parse, then call the library (imports are lazy)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from allcluster.config import ConfigError


def _add_set(parser: argparse.ArgumentParser, example: str = "optim.lr=1e-4") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (repeatable)")


def cmd_index(args: argparse.Namespace) -> int:
    from allcluster.data.manifest import IndexConfig, format_summary, run_index
    from allcluster.config import as_option, from_dict

    limits = {"max_pixels": args.max_pixels, "min_side": args.min_side}     # unset: IndexConfig's defaults
    cfg = from_dict(IndexConfig, {
        "source": args.source, "out": args.out, "ratios": args.ratios, "folds": args.folds, "seed": args.seed,
        "patient_regex": args.patient_regex, "workers": args.workers,
        **{key: value for key, value in limits.items() if value is not None}}, "allcluster index", as_option)
    _, summary = run_index(cfg)
    print(format_summary(summary))
    print(f"manifest: {Path(cfg.out).resolve()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from allcluster.config import config_source, load
    from allcluster.train.config import TrainConfig, resolve
    from allcluster.train.ray_train import run_training

    cfg = resolve(load(TrainConfig, args.config, args.overrides), config_source(args.config, args.overrides))
    final = run_training(cfg, args.address)
    print(json.dumps({k: v for k, v in final.items() if k != "model_card"}, indent=2, default=str))
    print(f"outputs: {Path(cfg.output_dir).resolve()} (model/, metrics.parquet, config.yaml)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from allcluster.console import say
    from allcluster.config import config_source
    from allcluster.sweep.driver import collect_only, config_changes, grid_cells, load_sweep, run_sweep
    from allcluster.interrupt import EX_TEMPFAIL, Interrupted
    from allcluster.sweep.results import summary_text

    source = config_source(args.config, args.overrides)
    if args.trial_index is not None and args.new_config:
        raise ConfigError("--new-config cannot go with --trial-index (array tasks run at once): run "
                          f"`allcluster sweep --config {args.config} --collect --new-config` first")
    sweep, trials = load_sweep(args.config, args.overrides)
    if args.check:
        return _check_sweep_run(args, sweep, trials, source)
    if args.dry_run:
        from allcluster.sweep.estimate import dry_run_text
        changes = config_changes(sweep, source)
        if changes:
            print(f"base config changed since {sweep.experiment_dir} started (a run needs --new-config): "
                  + "; ".join(changes))
        print(dry_run_text(trials, grid_cells(sweep), probe=not args.no_probe))
        return 0
    if args.trial_index is not None:
        return _sweep_array_task(args, sweep, trials, source)
    try:
        if args.collect:
            table, stopped_by = collect_only(sweep, trials, source, args.new_config), ""
        else:
            table, stopped_by = run_sweep(sweep, trials, args.retry_errored, args.address, source, args.new_config)
    except Interrupted as err:        # a second signal before Ray started, or one during --collect
        say(f"[sweep] interrupted by {err.signal_name}; rerun the same command to resume (exit {EX_TEMPFAIL})")
        return EX_TEMPFAIL
    exp = Path(sweep.experiment_dir).resolve()
    print(summary_text(table))
    best = f"; best model: {exp / 'best_model'}" if (exp / "best_model").is_dir() else ""
    print(f"tables: {exp / 'trials.parquet'}, {exp / 'epochs.parquet'}{best}")
    return sweep_exit_code(table, stopped_by, args.collect)


def sweep_exit_code(table, stopped_by: str, collect: bool) -> int:
    """75 (requeue me) while trials are left that a rerun would resume: a stop signal ended the run
    early, or trials lost their Ray processes; else 0 when a trial finished (or none is planned), 1.
    A signal after the last trial ended (its tables were written under hold) leaves nothing to
    resume: 75 would only have Slurm requeue a finished sweep."""
    from allcluster.console import say
    from allcluster.interrupt import EX_TEMPFAIL
    from allcluster.sweep.schema import UNFINISHED

    left = int(table["status"].isin(UNFINISHED).sum())
    if left and (stopped_by or not collect):
        why = f"interrupted by {stopped_by}" if stopped_by else "trials lost their Ray processes (see above)"
        say(f"[sweep] {why}: {left} of {len(table)} trials unfinished; "
            f"rerun the same command to resume (exit {EX_TEMPFAIL})")
        return EX_TEMPFAIL
    if stopped_by:
        say(f"[sweep] {stopped_by} came after every trial had ended: nothing to resume")
    return 0 if (table["status"] == "finished").any() or not len(table) else 1


def _check_sweep_run(args: argparse.Namespace, sweep, trials, source: str) -> int:
    """``allcluster sweep --check``: the run's own refusals, without Ray and without writing."""
    from allcluster.sweep.driver import check_before_run

    if args.collect:
        raise ConfigError("--check checks a run of trials; --collect runs none (and needs no Ray)")
    _, changes, to_run = check_before_run(sweep, trials, source, args.retry_errored, args.new_config,
                                          args.trial_index)
    print(f"{source}: a run would train {len(to_run)} of {len(trials)} planned trials"
          + (f" (--new-config: {'; '.join(changes)})" if changes else ""))
    return 0


def _sweep_array_task(args: argparse.Namespace, sweep, trials, source: str) -> int:
    """``allcluster sweep --trial-index I``: 0 finished (or stopped), 1 errored, 75 interrupted."""
    from allcluster.console import say
    from allcluster.sweep.driver import run_array_task
    from allcluster.interrupt import EX_TEMPFAIL
    from allcluster.sweep.schema import UNFINISHED

    status, stopped_by = run_array_task(sweep, trials, args.trial_index, args.retry_errored, args.address, source)
    trial = trials[args.trial_index]
    if status in UNFINISHED:         # no signal: the trial's Ray processes died; a signal after it ended: 0/1
        why = f"interrupted by {stopped_by}" if stopped_by else "its Ray processes died"
        say(f"[sweep] {why}: trial {args.trial_index} ({trial.trial_id}) is {status}; "
            f"rerun the same command to resume (exit {EX_TEMPFAIL})")
        return EX_TEMPFAIL
    print(f"trial {args.trial_index} ({trial.trial_id}): {status}; folder {trial.dir}")
    sets = "".join(f" --set {shlex.quote(o)}" for o in args.overrides)    # the same experiment, as run here
    print(f"when every array task has ended: allcluster sweep --config {shlex.quote(args.config)}{sets} --collect")
    return 1 if status == "errored" else 0


def load_score_config(args: argparse.Namespace):
    """The scoring config: YAML (optional), then --model/--input/--out, then --set overrides."""
    from allcluster.config import apply_overrides, config_source, from_dict, read_yaml
    from allcluster.score.config import ScoreConfig, check

    data = read_yaml(args.config) if args.config else {}
    data.update({k: getattr(args, k) for k in ("model", "input", "out") if getattr(args, k)})
    source = config_source(args.config or "allcluster score", args.overrides)
    cfg = from_dict(ScoreConfig, apply_overrides(data, args.overrides, ScoreConfig), source)
    return check(cfg, source)


def cmd_score(args: argparse.Namespace) -> int:
    from allcluster.score.inputs import Shard

    cfg = load_score_config(args)
    shard = Shard.parse(args.shard) if args.shard else Shard()
    if args.check:
        from allcluster.score.ray_data import check_before_run

        check_before_run(cfg, shard)
        print(f"{args.config or 'allcluster score'}: a run would score {cfg.input} with {cfg.model} into {cfg.out}")
        return 0
    if args.dry_run:
        from allcluster.score.estimate import dry_run_text
        print(dry_run_text(cfg, args.retry_errors, shard))
        return 0
    from allcluster.interrupt import EX_TEMPFAIL
    from allcluster.score.ray_data import run_score

    summary = run_score(cfg, args.address, args.retry_errors, shard)
    print(json.dumps(summary, indent=2))
    print(f"rows: {Path(cfg.out).resolve() / 'rows'} (Parquet); heatmaps: {Path(cfg.out).resolve() / 'heatmaps'}")
    return EX_TEMPFAIL if summary.get("interrupted") else 0


EXPLAIN_METHODS = "gradcam,gradcam++,scorecam,lime"     # explain --model's defaults
EXPLAIN_LIME_SAMPLES = 1000


def cmd_explain(args: argparse.Namespace) -> int:
    from allcluster.explain.panel import explain_from_scores, explain_images, format_results

    if bool(args.model) == bool(args.scores):
        raise ConfigError("explain: give --model (run the explainers) or --scores OUT (show a scoring job's stored maps)")
    if args.scores and args.lime_samples is not None:
        raise ConfigError("explain --scores: --lime-samples applies to --model only (a scoring job's LIME maps "
                          "are drawn as it stored them)")
    try:
        if args.scores:
            results = explain_from_scores(args.scores, args.images, args.out, args.methods)
        else:
            results = explain_images(args.model, args.images, args.out,
                                     EXPLAIN_METHODS if args.methods is None else args.methods,
                                     args.device,
                                     EXPLAIN_LIME_SAMPLES if args.lime_samples is None else args.lime_samples)
    except ValueError as err:                      # unknown method, CUDA asked for but absent
        raise ConfigError(str(err)) from err
    print(format_results(results))
    return 0 if all(r["status"] == "ok" for r in results) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from allcluster.config import as_option, from_dict
    from allcluster.report import ReportOptions, build_report

    options = from_dict(ReportOptions, {
        "metric": args.metric, "group_by": args.group_by or ["folder"], "malignant": args.malignant,
        "gallery_per_class": args.gallery_per_class, "curves": args.curves, "morning_rows": args.morning_rows},
        "allcluster report", as_option)
    result = build_report(args.inputs, args.out, options)
    counts = {k: v for k, v in result.get("scoring", {}).items() if k != "confusion"}
    print(json.dumps({"trials": result["trials"], "scoring": counts, "notes": result["notes"]}, indent=2))
    print(f"report: {result['index']} (tables/, plots/, morning_list.csv)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from allcluster.demo import run_demo

    run_demo(Path(args.out), args.overrides)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from allcluster.models.classifier import weights_status
    from allcluster.models.registry import REGISTRY

    print(f"{'backbone':<24}{'input':>6}  {'CAM layer':<32}{'papers':<12}{'weights here':<13}source")
    for name, spec in sorted(REGISTRY.items()):
        available, where = weights_status(spec)
        print(f"{name:<24}{spec.input_size:>6}  {spec.cam_layer:<32}{','.join(spec.papers):<12}"
              f"{'yes' if available else 'no':<13}{where}")
    return 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from allcluster.models.registry import REGISTRY
    from allcluster.models.weights import fetch_weights

    unknown = [name for name in args.backbones if name not in REGISTRY]
    if unknown:                                    # refuse before fetching any of them
        raise ConfigError(f"unknown backbone(s) {', '.join(unknown)}; `allcluster models` lists them")
    for name in args.backbones:
        print(fetch_weights(name))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from allcluster.bench import run_benchmark

    result = run_benchmark(args)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from allcluster.config_registry import check_config

    for path in args.files:
        try:
            stage = check_config(path, args.stage, args.overrides)
        except KeyError as err:
            raise ConfigError(err.args[0]) from None
        print(f"{path}: valid {stage} config")
    return 0


def _add_check(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--check", action="store_true",
                   help=f"exit 2 with the error where this run would refuse ({what}), else 0; starts no Ray, writes nothing "
                        "(the Slurm scripts run it before Ray starts on the job's nodes)")


def build_parser() -> argparse.ArgumentParser:
    from allcluster import __version__

    parser = argparse.ArgumentParser(prog="allcluster", description=__doc__)
    parser.add_argument("--version", action="version", version=f"allcluster {__version__}")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                        help="allcluster's progress lines on stderr (default: $ALLCLUSTER_LOG_LEVEL or info); "
                             "warning keeps only problems")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic 4-class demo: generate, index, train on a local Ray (CPU)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    _add_set(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("index", help="build a manifest Parquet with leak-free splits from images or a CSV")
    p.add_argument("source", help="folder of <class>/<images>, or a CSV with path,label[,patient]")
    p.add_argument("--out", required=True, help="manifest Parquet to write")
    p.add_argument("--ratios", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--folds", type=int, default=0, help="k-fold: test held out, rest in K grouped folds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patient-regex", default="", help="patient id from the file name (first group)")
    p.add_argument("--max-pixels", type=int, help="refuse larger images, decompression bombs (default: 50000000)")
    p.add_argument("--min-side", type=int, help="refuse images with a smaller side, in pixels (default: 8)")
    p.add_argument("--workers", type=int, default=0, help="decode threads (0: all cores)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("train", help="one training run as a Ray Train TorchTrainer")
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    _add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="a Ray Tune grid of training runs (backbone x augmentation x optimizer ...)",
                       description="Run (or resume: rerun the same command) a sweep. On SIGINT, SIGTERM or "
                       "SIGUSR1 running trials stop at their last epoch checkpoint, the tables are written "
                       "and the command exits 75: rerun it to resume.")
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid, each trial's state and measured cost estimates; schedule nothing")
    p.add_argument("--no-probe", action="store_true", help="with --dry-run: skip the throughput probe")
    _add_check(p, "the config, every planned trial, an experiment another run holds, the base config against "
                  "the experiment's, the manifest and the weights")
    p.add_argument("--retry-errored", action="store_true", help="rerun trials that errored before")
    p.add_argument("--new-config", action="store_true",
                   help="the base config changed on purpose: move the old outputs to EXPERIMENT/superseded-<time>/ "
                        "and start every trial afresh (without it such a rerun is refused, naming the keys)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--trial-index", type=int, metavar="I",
                      help="array mode: run only planned trial I (0..N-1; --dry-run lists them) as one Ray Train "
                           "run without Tune, e.g. as Slurm array task I; ASHA is a Tune-only feature and does not "
                           "apply. Then --collect")
    mode.add_argument("--collect", action="store_true",
                      help="write trials.parquet, epochs.parquet and best_model/ from the trial folders (after the "
                           "array tasks); runs no trial, needs no Ray")
    _add_set(p, "train.fit.epochs=3")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("score", help="score and explain an image archive with Ray Data into Parquet + heatmaps")
    p.add_argument("--model", help="exported model directory (model_card.json + weights.safetensors)")
    p.add_argument("--input", help="folder tree, manifest .parquet, or text file of paths")
    p.add_argument("--out", help="output folder; rerunning the same command resumes")
    p.add_argument("--config", help="scoring YAML (configs/score/*.yaml); --model/--input/--out/--set win")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--dry-run", action="store_true", help="list the inputs and predict the job's time from "
                   "measured per-image costs; score nothing")
    p.add_argument("--retry-errors", action="store_true", help="also score again the files whose error is "
                   "determined by their content (transient errors are always retried)")
    _add_check(p, "the config, the model card, the input, an --out another run holds or that holds rows of "
                  "other settings")
    p.add_argument("--shard", metavar="K/N", help="score only part K of N (by path hash) into the shared --out, "
                   "e.g. a Slurm array task: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    _add_set(p, "explain.budget.max_images=500")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("explain", help="one PNG panel per image: the image and each method's heatmap")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="explanations", help="folder for the panels (default: ./explanations)")
    p.add_argument("--model", help="exported model directory: run the explainers on the images")
    p.add_argument("--methods", help=f"comma-separated explainers (default: {EXPLAIN_METHODS}); with --scores: "
                   "which stored maps to draw (default: all)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--lime-samples", type=int,
                   help=f"LIME's perturbed images per image (at least 10; default: {EXPLAIN_LIME_SAMPLES}; --model only)")
    p.add_argument("--scores", metavar="OUT", help="instead of --model: a scoring output; show the maps it "
                   "stored for the images (found by content; no model runs)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("report", help="result tables, plots and a static HTML report from sweep and scoring Parquet")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="sweep experiment folders and/or scoring output folders (or their Parquet files)")
    p.add_argument("--out", required=True, help="report folder (index.html, tables/, plots/, morning_list.csv)")
    p.add_argument("--metric", default="test_macro_f1", help="trials.parquet column of the pivots (default: %(default)s)")
    p.add_argument("--group-by", action="append", default=[], metavar="COLUMN",
                   help="scoring roll-up by this row column, e.g. folder, patient, label (repeatable; default: folder)")
    p.add_argument("--malignant", action="append", default=[], metavar="CLASS",
                   help="class counted as malignant for the morning list (repeatable; default: all but Benign)")
    p.add_argument("--gallery-per-class", type=int, default=4, metavar="N",
                   help="most confident and most uncertain images per predicted class (default: %(default)s)")
    p.add_argument("--curves", type=int, default=3, metavar="N",
                   help="training curves of the best N trials (default: %(default)s)")
    p.add_argument("--morning-rows", type=int, default=50, metavar="N",
                   help="morning-list rows shown in the HTML; morning_list.csv has every row (default: %(default)s)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check-config", help="validate config files as a run would (before you sbatch them)")
    p.add_argument("files", nargs="+", metavar="CONFIG")
    p.add_argument("--stage", choices=["train", "sweep", "score", "demo"],
                   help="what the file configures (default: from its folder, configs/<stage>/)")
    _add_set(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("models", help="list the backbone registry")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("weights", help="pretrained weights: pre-stage on a machine with internet")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    f = wsub.add_parser("fetch", help="download into the timm/HF cache (run on a login node)")
    f.add_argument("backbones", nargs="+")
    f.set_defaults(func=cmd_weights_fetch, hub_online=True)   # the one command that may go online

    p = sub.add_parser("bench", help="benchmarks; print JSON")
    from allcluster.bench import add_bench_arguments
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from allcluster.interrupt import InterruptionCaught, end_of_process, interrupted_exit, stop_at_once

    if argv is None:                        # the command line, not a library or test call
        stop_at_once()
        from allcluster.device import restart_on_preferred_malloc
        restart_on_preferred_malloc()       # tcmalloc for this process too (dry-run probe, explain, benches)
        return end_of_process(main(sys.argv[1:]))
    with InterruptionCaught() as caught:    # outside a run's graceful stop (see allcluster.interrupt)
        return _run(argv)
    return interrupted_exit(caught.signal_name)


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_level:
        from allcluster.console import set_level
        set_level(args.log_level)
    from allcluster.models.weights import set_hub_offline
    set_hub_offline(not getattr(args, "hub_online", False))
    from allcluster.device import use_fast_allocator
    try:
        use_fast_allocator()                # before torch first allocates (dry runs, explain, benches)
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:     # user errors: one clear line, no traceback
        shown = getattr(err, "cause", None) or err      # one raised in a Ray task: its own text, not Ray's header
        print(f"allcluster {args.command}: error: {shown}", file=sys.stderr)
        return 2
    except Exception as err:                # noqa: BLE001 - a full disk or quota, wherever met: one line, 74
        from allcluster.interrupt import storage_full_cause

        full = storage_full_cause(err)
        if full is None:
            raise
        print(f"allcluster {args.command}: error: {full.filename or 'writing'}: {os.strerror(full.errno)}; what was "
              "written before is kept: free space (or raise the quota), then rerun the same command to resume "
              f"(exit {os.EX_IOERR})", file=sys.stderr)
        return os.EX_IOERR


if __name__ == "__main__":
    sys.exit(main())

"""`balancebeam study`: does balancing remove a model's bias, and what does it cost? (the paper's
study)

Makes (or takes) data, builds the variants, trains a model per variant, schedule and seed, evaluates
every checkpoint and writes results.json, results.md and plots. Resumable: finished units are
skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path


from pipeline import hashing
from pipeline.study import config as study_config, results as study_results
from pipeline.files import write_json_atomically
from pipeline.study.config import BALANCED, BALANCED_PROXIES, M4_VARIANTS, ORIGINAL, RANDOM
from pipeline.study.data_bias import data_directions, labelled_data_bias, subset_data_bias
from solvers import progress as progress_policy

log = logging.getLogger(__name__)

DONE_FILE = "done.json"  # a unit of work is finished iff its directory holds this marker
# keyed-hash purpose: independent of the balanced release's own draws
RANDOM_PURPOSE = "study-random"
FINAL_CHECKPOINT = "final.pt"


def finished(directory: Path, what: str):
    """The unit's recorded result if its marker exists (and say it is skipped), else None."""
    marker = directory / DONE_FILE
    if marker.exists():
        log.info("skipping %s (done)", what)
        return json.loads(marker.read_text(encoding="utf-8"))
    return None


# ---------------------------------------------------------------------------------------------- dat
def prepare_data(config: dict, output: Path) -> dict:
    """Generate the synthetic data, or describe the given data; returns train/eval/concepts."""
    directory = output / "data"
    data = config["data"]
    if data["train"] is not None:
        concepts = data["concepts"]
        if isinstance(concepts, str):
            from pipeline.balance import read_label_list
            concepts = read_label_list(concepts)
        return {"train": data["train"], "eval": data["eval"], "concepts": list(concepts)}
    done = finished(directory, "synthetic data")
    if done is None:
        from trainer.synth import SynthConfig, make_synthetic

        synthetic = dict(data["synthetic"])
        if "concepts" in synthetic:
            synthetic["concepts"] = tuple(synthetic["concepts"])
        manifest = make_synthetic(directory, SynthConfig(**synthetic))
        done = {"train": str(directory / "train" / "*.tar"), "eval": str(directory),
                "concepts": manifest["concepts"], "train_samples": manifest["train_samples"],
                "planted_woman_share": manifest["planted_woman_share"]}
        write_json_atomically(directory / DONE_FILE, done, indent=2, sort_keys=True)
    return done


# ------------------------------------------------------------------------------------------ variant
def balance_variant(name: str, config: dict, data: dict, output: Path) -> dict:
    """M4-balanced release of the training data via `balancebeam run` (annotate -> report)."""
    from pipeline import run_all

    directory = output / "variants" / name
    done = finished(directory, f"variant {name}")
    if done is not None:
        return done
    directory.mkdir(parents=True, exist_ok=True)
    concepts_file = directory / "concepts.txt"
    concepts_file.write_text("# labels of interest\n" + "\n".join(data["concepts"]) + "\n",
                             encoding="utf-8")
    settings = config["balance"]
    proxies = settings["proxies"] if name == BALANCED_PROXIES else 0
    run_dir = directory / "run"
    argv = [
        "--input", data["train"], "--output", str(run_dir), "--concepts", str(concepts_file),
        "--proxies", str(proxies), "--keep-rate", str(settings["keep_rate"]), "--min-support",
        str(settings["min_support"]), "--mode", settings["mode"], "--samples-per-shard",
        str(settings["samples_per_shard"]), "--seed", str(config["seeds"][0]),
        *[str(a) for a in settings["extra_args"]]
    ]
    args, rest = run_all.build_parser().parse_known_args(argv)
    annotate_args, extra_beam_args = run_all.split_annotate_args(rest)
    log.info("variant %s: M4 balancing with proxies: %s", name, proxies)
    stats = run_all.run_all(args.input, args.output, args, annotate_args,
                            [*extra_beam_args, *config["beam_args"]])
    paths = run_all.layout(str(run_dir))
    head = _headline(stats)
    proxies = [p.get("concept", p) if isinstance(p, dict) else p
               for p in stats.get("proxies", [])]
    done = {"shards": str(Path(paths["release"]) / "*.tar"), "keep_rate": stats["keep_rate"],
            "run": str(run_dir), "rows": stats["rows"], "proxies": proxies,
            "data_bias": {"before": head["before"], "after": head["realized"],
                          "planned": head["planned"]},
            "stats": str(Path(paths["release"]) / "stats.json")}
    write_json_atomically(directory / DONE_FILE, done, indent=2, sort_keys=True)
    return done


def _headline(stats: dict) -> dict:
    from pipeline import report

    return report.headline(stats)


def random_variant(config: dict, data: dict, balanced: dict, output: Path) -> dict:
    """The control: each example kept iff keyed_uniform(seed, key) < keep_rate (no look at content).
    """
    import webdataset as wds

    from trainer.data import expand_shards

    directory = output / "variants" / RANDOM
    done = finished(directory, f"variant {RANDOM}")
    if done is not None:
        return done
    shard_dir = directory / "shards"
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True)
    seed, per_shard = config["seeds"][0], int(config["balance"]["samples_per_shard"])
    keep_rate = balanced["keep_rate"]
    read, kept_keys, writer, shard_index = 0, set(), None, 0
    samples = wds.DataPipeline(wds.SimpleShardList(expand_shards(data["train"])),
                               wds.tarfile_to_samples(handler=wds.reraise_exception))
    for sample in samples:
        read += 1
        if not hashing.keep_bernoulli(
                keep_rate, hashing.keyed_uniform(seed, sample["__key__"], RANDOM_PURPOSE)):
            continue
        if len(kept_keys) % per_shard == 0:
            if writer is not None:
                writer.close()
            shard_path = shard_dir / f"random-{shard_index:05d}.tar"
            writer = wds.TarWriter(str(shard_path), encoder=False, mtime=0)
            shard_index += 1
        writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
        kept_keys.add(sample["__key__"])
    kept = len(kept_keys)
    if writer is not None:
        writer.close()
    if kept == 0:
        raise ValueError(
            f"the random control kept nothing of {read} samples at keep rate {keep_rate:.3f}")
    log.info("variant %s: kept %d of %d samples (keep rate %.3f, the balanced variant's)", RANDOM,
             kept, read, keep_rate)
    done = {"shards": str(shard_dir / "*.tar"), "keep_rate": keep_rate,
            "rows": {"samples_read": read, "kept": kept, "rate_kept": kept / read},
            "data_bias": {"after": subset_data_bias(balanced["run"], kept_keys)}}
    write_json_atomically(directory / DONE_FILE, done, indent=2, sort_keys=True)
    return done


def prepare_variants(config: dict, data: dict, output: Path) -> dict:
    variants = {ORIGINAL: {"shards": data["train"]}}
    for name in M4_VARIANTS:
        if name in config["variants"]:
            variants[name] = balance_variant(name, config, data, output)
    if RANDOM in config["variants"]:
        variants[RANDOM] = random_variant(config, data, variants[BALANCED], output)
    if BALANCED in variants:  # the original's data bias is the balanced release's "before"
        variants[ORIGINAL]["data_bias"] = {"after": variants[BALANCED]["data_bias"]["before"]}
    return variants


# ----------------------------------------------------------------------------------- train + evalua
def checkpoint_step(path: Path, steps: int) -> int:
    return steps if path.name == FINAL_CHECKPOINT else int(path.stem.split("-")[1])


def evaluate_checkpoints(run_dir: Path, eval_dir: Path, evaluation_set, eval_config,
                         steps: int) -> dict:
    """Evaluate every checkpoint of a run once (cached as JSON per step); returns {step: metrics}.
    """
    from trainer import evaluate, models

    results = {}
    checkpoints = sorted(
        (run_dir / "checkpoints").glob("step-*.pt")) + [run_dir / "checkpoints" / FINAL_CHECKPOINT]
    for path in checkpoints:
        step = checkpoint_step(path, steps)
        target = eval_dir / f"step-{step:07d}.json"
        if not target.exists():
            model, tokenizer, preprocess, _ = models.load_checkpoint(path)
            result = evaluate.evaluate_model(model, tokenizer, preprocess, evaluation_set,
                                             eval_config)
            write_json_atomically(target, study_results.summarize_evaluation(result), indent=2,
                                  sort_keys=True)
    # also those of checkpoints pruned after evaluation
    for target in sorted(eval_dir.glob("step-*.json")):
        results[int(target.stem.split("-")[1])] = json.loads(target.read_text(encoding="utf-8"))
    return results


def train_run(name: str, seed: int, shards: str, config: dict, output: Path, steps: int,
              init_checkpoint: str | None, keep_steps: set, evaluation) -> dict:
    """One training run (resumes a half-done one), its evaluations, then prune unneeded checkpoints.
    """
    from trainer.train import TrainConfig, train

    run_dir = output / "runs" / name / f"seed-{seed}"
    done = finished(run_dir, f"training {name} seed {seed}")
    if done is not None:
        return done
    settings = config["train"]
    every = settings["steps"] // settings["checkpoints"]
    sample_weights = settings["sample_weights"]
    if sample_weights is None:
        sample_weights = config["balance"]["mode"] == "weights"
    warmup = int(settings["warmup_steps"])
    if init_checkpoint:
        warmup = min(warmup, max(1, steps // 10))
    final = run_dir / "checkpoints" / FINAL_CHECKPOINT
    if final.exists() and not (run_dir / "checkpoints" / "latest.pt").exists():
        # stopped after pruning, before the marker: the training itself is finished
        log.info("training %s seed %d finished before; evaluating its checkpoints", name, seed)
        summary = {"steps": steps, "checkpoint": str(final), "steps_per_s": None}
    else:
        log.info("training %s seed %d: %d steps%s", name, seed, steps,
                 f" from {init_checkpoint}" if init_checkpoint else "")
        summary = train(
            TrainConfig(data=shards, output=str(run_dir), model=settings["model"],
                        loss=settings["loss"], steps=steps, batch_size=int(settings["batch_size"]),
                        lr=float(settings["lr"]), warmup_steps=warmup, seed=seed,
                        threads=int(settings["threads"]), save_every=every, log_every=every,
                        progress=False, resume="auto", init_checkpoint=init_checkpoint,
                        sample_weights=bool(sample_weights)))
    evaluation_set, eval_config = evaluation
    evaluations = evaluate_checkpoints(run_dir, output / "evals" / name / f"seed-{seed}",
                                       evaluation_set, eval_config, steps)
    for path in (run_dir / "checkpoints").glob("*.pt"):  # ~75 MB each with the optimizer state
        if path.name == "latest.pt" or (path.name != FINAL_CHECKPOINT
                                        and checkpoint_step(path, steps) not in keep_steps):
            path.unlink()
    done = {
        "name": name, "seed": seed, "steps": summary["steps"], "checkpoint": summary["checkpoint"],
        "init_checkpoint": init_checkpoint, "steps_per_s": summary["steps_per_s"],
        "evaluations": {str(step): value
                        for step, value in sorted(evaluations.items())}
    }
    write_json_atomically(run_dir / DONE_FILE, done, indent=2, sort_keys=True)
    return done


def run_study(config: dict) -> dict:
    """Every unit in order: data, variants, variant runs, schedule runs, results. Returns results.
    """
    from trainer import data as shard_data
    from trainer.evaluate import EvalConfig

    output = Path(config["output"])
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomically(output / "config.json",
                          {**config, "schedules": [s.__dict__ for s in config["schedules"]]},
                          indent=2, sort_keys=True)
    data = prepare_data(config, output)
    variants = prepare_variants(config, data, output)
    evaluation_set = shard_data.read_labelled(data["eval"])
    eval_config = EvalConfig(attribute_template=config["evaluation"]["attribute_template"],
                             concept_template=config["evaluation"]["concept_template"],
                             concepts=list(data["concepts"]))
    evaluation = (evaluation_set, eval_config)
    weighted = config["balance"]["mode"] == "weights"
    for variant in variants.values():  # a second, content-level view of each variant's data bias
        variant["labelled_data_bias"] = labelled_data_bias(variant["shards"], eval_config,
                                                           float(config["balance"]["min_support"]),
                                                           weighted)
    steps = int(config["train"]["steps"])
    runs = {}
    seeds = config["seeds"]
    bar = progress_policy.bar(progress_policy.enabled(),
                              (len(config["variants"]) + len(config["schedules"])) * len(seeds),
                              "study", "run", leave=True)
    for name in config["variants"]:
        keep = {round(s.switch_at * steps) for s in config["schedules"] if s.first == name}
        for seed in seeds:
            runs[(name, seed)] = train_run(name, seed, variants[name]["shards"], config, output,
                                           steps, None, keep, evaluation)
            if bar is not None:
                bar.update(1)
    for schedule in config["schedules"]:
        switch = round(schedule.switch_at * steps)
        for seed in seeds:
            run_dir = output / "runs" / schedule.first / f"seed-{seed}"
            init = run_dir / "checkpoints" / f"step-{switch:07d}.pt"
            then_shards = variants[schedule.then]["shards"]
            runs[(schedule.name, seed)] = train_run(schedule.name, seed, then_shards, config,
                                                    output, steps - switch, str(init), set(),
                                                    evaluation)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    balanced = next((variants[name] for name in M4_VARIANTS if name in variants), None)
    directions = data_directions(balanced["stats"],
                                 eval_config.attribute_values[0]) if balanced else {}
    results = study_results.collect(config, variants, runs, directions)
    study_results.write_outputs(results, output)
    return results


def run(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # open_clip logs every model creation at INFO on the root logger
    for name in ("pipeline", "trainer"):
        logging.getLogger(name).setLevel(logging.INFO)
    parser = argparse.ArgumentParser(
        prog="balancebeam study", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=
        "examples:\n  balancebeam study\n  balancebeam study --config my-study.yaml --output "
        "runs/study\n"
    )
    parser.add_argument("--config", default=str(study_config.SHIPPED_CONFIG),
                        help="study YAML (default: the shipped pipeline/study/configs/study.yaml)")
    parser.add_argument("--output", help="working directory (overrides the config's output)")
    args = parser.parse_args(argv)
    try:
        config = study_config.load(args.config, args.output)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"balancebeam study: {error}", file=sys.stderr)
        return 2
    from solvers.errors import InfeasibleError

    try:
        results = run_study(config)
    except (InfeasibleError, ValueError, FileNotFoundError) as error:
        print(f"balancebeam study: {error}", file=sys.stderr)
        return 1
    output = Path(config["output"])
    print(study_results.markdown_table(results))
    print(f"results: {output / study_results.RESULTS_JSON}, {output / study_results.RESULTS_MD}, "
          f"{output / study_results.PLOT_FILE}")
    return 0

"""`balancebeam demo`: the whole curation job on planted-bias data the product makes itself.

Writes synthetic WebDataset shards (trainer.synth), runs `balancebeam run` on them and prints where
the release, its report and its dataset card are, with the data bias before and after.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline import report, run_all

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "balancebeam-demo"
# At 20,000 samples each synthetic concept keeps ~1,000 annotated rows after balancing: enough
# rows for a readable report (the release's exact counts meet the gap at any size). The whole demo
# takes ~30 s on 2 cores.
DEFAULT_NUM_SAMPLES = 20000
# Synthetic concepts have ~340 rows each even at 3,000 samples: 20 keeps every one of them
# constrained.
DEMO_MIN_SUPPORT = 20
DEMO_PROXIES = 2  # the generator plants two proxy objects (handbag, tie)
DEMO_SAMPLES_PER_SHARD = 500


def make_data(directory: str, num_samples: int, seed: int) -> dict:
    from trainer.synth import SynthConfig, make_synthetic

    return make_synthetic(directory, SynthConfig(num_samples=num_samples, seed=seed))


def demo(output: str, num_samples: int = DEFAULT_NUM_SAMPLES, keep_rate: str = "max", seed: int = 0,
         beam_args=()) -> dict:
    """Make data, run the four jobs, return the release statistics."""
    data_dir = os.path.join(output, "data")
    manifest = make_data(data_dir, num_samples, seed)
    concepts_file = os.path.join(output, "concepts.txt")
    with open(concepts_file, "w", encoding="utf-8") as handle:
        handle.write("# concepts of interest of the synthetic data\n" +
                     "\n".join(manifest["concepts"]) + "\n")
    inputs = [os.path.join(data_dir, "train", "*.tar")]
    argv = [
        "--input", inputs[0], "--output", os.path.join(output, "run"), "--concepts", concepts_file,
        "--proxies", str(DEMO_PROXIES), "--keep-rate", keep_rate, "--min-support",
        str(DEMO_MIN_SUPPORT), "--samples-per-shard", str(DEMO_SAMPLES_PER_SHARD), "--seed",
        str(seed)
    ]
    args, _ = run_all.build_parser().parse_known_args(argv)
    return run_all.run_all(inputs, args.output, args, beam_args=list(beam_args))


def run(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="balancebeam demo", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  balancebeam demo\n"
               "  balancebeam demo --output /tmp/demo --num-samples 5000 \\\n"
               "      --direct_running_mode=multi_processing --direct_num_workers=2\n")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"working directory (default ./{DEFAULT_OUTPUT})")
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    parser.add_argument("--keep-rate", default="max",
                        help="fraction to keep, or 'max' (the largest feasible)")
    parser.add_argument("--seed", type=int, default=0)
    args, beam_args = parser.parse_known_args(argv)
    stats = demo(args.output, args.num_samples, args.keep_rate, args.seed, beam_args)
    paths = run_all.layout(os.path.join(args.output, "run"))
    head = report.headline(stats)
    rows = stats["rows"]
    print()
    print(f"release:      {paths['release']}/  ({rows['output_samples']} samples, manifest.json)")
    print(f"report:       {os.path.join(paths['release'], report.REPORT_FILE)}")
    print(f"dataset card: {os.path.join(paths['release'], report.CARD_FILE)}")
    print(f"kept {rows['kept']} of {rows['samples_read']} records ({rows['rate_kept']:.1%}; "
          f"keep rate solved: {stats['keep_rate']:.3f})")
    print(f"{'':10} {'RB':>8} {'AB max':>8} {'AB mean':>8}")
    for stage in ("before", "planned", "realized"):
        values = head[stage]
        print(f"{stage:10} {report.number(values['representation_bias'], 3):>8} "
              f"{report.number(values['association_bias_max'], 3):>8} "
              f"{report.number(values['association_bias_mean'], 3):>8}")
    print(
        "(planned: the data weighted by q exactly; realized: counted in the release, which keeps\n"
        " whole rows per signature so every constrained share meets its gap)")
    sys.stdout.flush()
    return 0

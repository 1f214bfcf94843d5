"""Retrain the default built-in model from config/config.yaml and check that its weights equal the
shipped ones (patchmap/pretrained/): training is deterministic, so the sha256 must match.

    python benchmarks/retrain_default.py                # train in a temporary directory, compare
    python benchmarks/retrain_default.py --out DIR      # keep the trained model in DIR (to ship it)

Takes minutes (one thread, by design). Exit status 1 when the hashes differ."""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import yaml

from patchmap import builtin, shipped
from patchmap import config as cfg

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=ROOT / "config" / "config.yaml", type=Path)
    parser.add_argument("--model", default="facts-llama")
    parser.add_argument("--out", type=Path, help="where to keep the trained model (default: a temporary directory)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = cfg.validate(yaml.safe_load(args.config.read_text()))
    world, shape, train = shipped.settings_from_config(config, args.model)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / args.model
        summary = builtin.train_builtin(out, world, shape, train, name=args.model)
        print(f"trained {args.model}: {summary['steps']} steps, question accuracy {summary['question_accuracy']}, "
              f"{summary['seconds']} s, weights sha256 {summary['weights_sha256']}")
        found = shipped.shipped_model(shipped.training_spec(world, shape, train))
        if found is None:
            print("no shipped weights were trained from this spec")
            return 1
        recorded = json.loads((found / "training.json").read_text())["weights_sha256"]
        same = recorded == summary["weights_sha256"]
        print(f"shipped {found}: sha256 {recorded}: {'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

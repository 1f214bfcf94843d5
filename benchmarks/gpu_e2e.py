"""End-to-end GPU benchmark: a paper-like run through `snakemake --cores all`, from checkpoint to heatmap.

    python benchmarks/gpu_e2e.py             # Llama-2-7B shape, bf16, one CUDA GPU, ~1,209 pairs
    python benchmarks/gpu_e2e.py --smoke     # a 2-layer, width-64 stand-in on the CPU (float32), 32 facts in
                                             # one shard: about a minute on an idle 2-core machine
    python benchmarks/gpu_e2e.py --keep DIR  # work in DIR and keep it (checkpoint, results, logs)

What it does, in a temporary working directory on local disk (no download):

1. writes a checkpoint with a Llama-2-7B config (32 layers, width 4096, 32 heads, MLP 11008, vocabulary
   32000) and random bf16 weights as safetensors, with a word-level tokenizer (tokenizer.json) for the
   built-in synthetic facts;
2. writes a known_1000-sized dataset: 1,209 synthetic facts as a JSON list in ROME's known_1000 format
   (known_id, subject, attribute, template, prompt, relation_id), chosen so that they pair;
3. runs the paper's Llama-2-7B run on them (swap; Subj., Attn., Last.; every layer; 256-example shards,
   batches of 32, device cuda, bfloat16; known_only false, as a random model knows no facts) with
   `snakemake --cores all` from this checkout (the working directory's own config, the workflow's
   default profile), timed from start to finish, the checkpoint's writing not included;
4. prints the total wall time; the seconds every job spent loading the model (the jobs' log lines
   `loaded model <name> in <s> s`), and how many loads; each rule's seconds (sum of its jobs' benchmark
   files, results/{run}/benchmarks/); the patch stage's seconds (the extract and patch jobs: process
   start, model load, extraction and patching); patched runs per second (examples x sites x layers over
   the patch stage's seconds); and TFLOP/s on the exact-work floor's FLOPs (patchmap/engines/flops.py
   floor_flops: the least any exact engine computes for this patch stage) over the same seconds.

The page cache decides how fast weights load: run it twice for a warm cache (`--keep DIR` reuses the
checkpoint, and deletes the results of the previous run first).
"""

import argparse
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from cli import positive

REPO = Path(__file__).resolve().parent.parent
RUN = "llama2-7b-random"
LOAD_LINE = re.compile(r"loaded model (.+) in ([0-9.]+) s")
STAGE_RULES = ("extract", "patch")  # the jobs of the patch stage (extraction may happen inside patch jobs)
SITES = {"subj": {"label": "Subj.", "component": "resid", "positions": "subject"},
         "attn": {"label": "Attn.", "component": "attn", "positions": "last"},
         "last": {"label": "Last.", "component": "resid", "positions": "last"}}
LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
SMOKE = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script end to end")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    parser.add_argument("--facts", type=positive, default=1209, help="facts in the dataset (known_1000 has 1,209)")
    parser.add_argument("--shard-size", type=positive, default=256)
    parser.add_argument("--batch-size", type=positive, default=32)
    parser.add_argument("--cores", default="all", help="snakemake --cores")
    args = parser.parse_args()
    if args.smoke:
        args.facts, args.shard_size, args.batch_size = min(args.facts, 32), min(args.shard_size, 32), 8
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke to check the script on the CPU)")

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="patchmap-e2e-")).resolve()
    try:
        model_dir = write_checkpoint(workdir / "checkpoint", args.smoke)
        dataset = write_dataset(workdir / "known_facts.json", args.facts)
        write_config(workdir, model_dir, dataset, args)
        shutil.rmtree(workdir / "results", ignore_errors=True)
        seconds = run_workflow(workdir, args.cores)
        report(workdir, args.smoke, seconds)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def model_config(smoke):
    import transformers

    from patchmap import synthetic
    from patchmap.builtin import word_tokenizer

    tokenizer = word_tokenizer(synthetic.vocabulary(synthetic.make_world(seed=0)))
    shape = {**LLAMA_7B, **(SMOKE if smoke else {})}
    config = transformers.LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return config, tokenizer


def write_checkpoint(path, smoke):
    """Random weights (bf16 for the 7B shape, float32 for --smoke) as safetensors, and the tokenizer; kept
    if the folder already holds a checkpoint of the same config."""
    import transformers

    config, tokenizer = model_config(smoke)
    dtype = torch.float32 if smoke else torch.bfloat16
    marker = path / "benchmark-shape.json"
    wanted = json.dumps({"shape": config.to_diff_dict(), "dtype": str(dtype)}, sort_keys=True)
    if marker.is_file() and marker.read_text() == wanted:
        print(f"checkpoint: reusing {path}")
        return path
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    marker.write_text(wanted)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"checkpoint: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters, {dtype}, "
          f"{size / 2**30:.2f} GiB of safetensors in {path}, written in {time.perf_counter() - start:.0f} s")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def write_dataset(path, n):
    """`n` synthetic facts in the known_1000 format, a seeded choice from the built-in world (2,400 facts,
    600 subjects x 4 relations), where nearly every fact has a swap partner."""
    from patchmap import synthetic

    facts = synthetic.facts(synthetic.make_world(seed=0))
    random.Random(0).shuffle(facts)
    rows = [{"known_id": i, "subject": f["subject"], "attribute": f["attribute"],
             "template": f["prompt"].replace(f["subject"], "{}", 1), "prompt": f["prompt"],
             "relation_id": f["relation"]} for i, f in enumerate(facts[:n])]
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_config(workdir, model_dir, dataset, args):
    run = {"model": "llama7b-random", "dataset": "known-facts", "intervention": "swap", "sites": list(SITES),
           "layers": "all", "examples": args.facts, "shard_size": args.shard_size, "batch_size": args.batch_size,
           "device": "cpu" if args.smoke else "cuda", "dtype": "float32" if args.smoke else "bfloat16",
           "seed": 0, "known_only": False}
    resources = {"gpus": 0 if args.smoke else 1, "cpus": 2 if args.smoke else 8, "mem_mb": 64000, "runtime": 240}
    config = {"models": {"llama7b-random": {"path": str(model_dir), "resources": resources}},
              "datasets": {"known-facts": {"path": str(dataset)}},
              "sites": SITES, "runs": {RUN: run}}
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def run_workflow(workdir, cores):
    """Seconds of `snakemake --cores <cores>` on the working directory's config, this checkout's package."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", cores]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed after {seconds:.0f} s (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return seconds


def model_loads(results):
    """(count, seconds) of the `loaded model ... in ... s` lines in every job log under results/."""
    found = [float(m[2]) for log in results.rglob("*.log") for m in LOAD_LINE.finditer(log.read_text(errors="replace"))]
    return len(found), sum(found)


def rule_seconds(run_dir):
    """{rule: (jobs, seconds)} from the benchmark files results/{run}/benchmarks/<rule>/...tsv."""
    out = defaultdict(lambda: [0, 0.0])
    benchmarks = run_dir / "benchmarks"
    for tsv in sorted(benchmarks.rglob("*.tsv")):
        rule = tsv.relative_to(benchmarks).parts[0]
        rule = rule[:-4] if rule.endswith(".tsv") else rule
        with open(tsv) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        out[rule][0] += 1
        out[rule][1] += sum(float(r["s"]) for r in rows)
    return dict(out)


def report(workdir, smoke, seconds):
    import transformers
    import xarray as xr
    from patchmap.engines.flops import floor_flops

    results = workdir / "results"
    pairs = xr.load_dataset(results / RUN / "pairs.nc")
    n_examples = pairs.sizes["example"]
    config, _ = model_config(smoke)
    with torch.device("meta"):  # for its shape only
        model = transformers.AutoModelForCausalLM.from_config(config)
    layers = config.num_hidden_layers
    runs = n_examples * len(SITES) * layers
    floor = floor_flops(model, pairs["length"].values, pairs["subject_end"].values)
    loads, load_seconds = model_loads(results)
    by_rule = rule_seconds(results / RUN)
    stage = sum(by_rule.get(r, (0, 0.0))[1] for r in STAGE_RULES)

    print(f"\n{n_examples} pairs x {len(SITES)} sites x {layers} layers = {runs} patched runs; "
          f"exact-work floor {floor / 1e12:.3g} TFLOP")
    print("| what | value |\n| --- | --- |")
    print(f"| total wall time (snakemake, start to finish) | {seconds:.1f} s |")
    if loads:
        print(f"| model loads (from the job logs) | {loads} loads, {load_seconds:.1f} s "
              f"({load_seconds / seconds:.0%} of the wall time) |")
    else:
        print("| model loads (from the job logs) | no `loaded model ... in ... s` lines in the logs |")
    for rule, (jobs, s) in sorted(by_rule.items()):
        print(f"| rule {rule} ({jobs} job{'s' if jobs != 1 else ''}, benchmark files) | {s:.1f} s |")
    if stage:
        print(f"| patch stage ({' + '.join(STAGE_RULES)} jobs) | {stage:.1f} s |")
        print(f"| patched runs per second (patch stage) | {runs / stage:.3g} |")
        print(f"| TFLOP/s on the exact-work floor (patch stage) | {floor / stage / 1e12:.3g} |")
    else:
        print("| patch stage | no benchmark files of rules " + ", ".join(STAGE_RULES) + " |")

if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

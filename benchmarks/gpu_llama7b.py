"""GPU benchmark: the fast engine on a Llama-2-7B-shaped model, the paper-sized job.

    python benchmarks/gpu_llama7b.py                 # 1,209 prompts x 3 sites x 32 layers, then the reference
    python benchmarks/gpu_llama7b.py --examples 200 --subset 16     # shorter
    python benchmarks/gpu_llama7b.py --flops         # any machine: the job's FLOPs, reference and floor
    python benchmarks/gpu_llama7b.py --heads --reference-batch 1    # the head sweep: 32 layers x 32 heads

It needs one CUDA GPU with about 40 GB free (13.5 GB of bf16 weights, the rest for activations), and no
download: the model is a Llama-2-7B config (32 layers, width 4096, 32 heads, MLP 11008, vocabulary 32000) with random
bf16 weights built on the GPU, and the prompts are the built-in synthetic facts (about 10 tokens each,
word-level tokenizer; token ids are far below the vocabulary size).

It prints the patch-stage time of the fast engine for all prompts x 3 sites (Subj., Attn., Last.) x every
layer, patched runs per second, and the achieved TFLOP/s counting only the FLOPs the schedule needs
(matrix multiplies of the blocks for the positions computed, attention scores, the output head at one
position per run, and the clean runs); then, on the first `--subset` prompts, the reference engine's time
on the same work, the speed-up, and the largest difference between the engines' numbers.

`--heads` runs the head sweep instead: every attention head of every layer patched alone at the last
position (one head site: 32 x 32 runs per prompt); `--reference-batch 1` then times the reference one prompt
at a time, one hooked forward per prompt, layer and head (plus one unpatched forward per prompt and head),
as TransformerLens' head patching runs. The exact-work floor is the three-site job's, so it is not printed.
"""

import argparse
import time

import torch
from cli import positive
from patchmap.engines.flops import fast_flops, floor_flops, job_shape, padded_batches, reference_flops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=positive, default=1209)
    parser.add_argument("--subset", type=positive, default=32, help="prompts for the reference comparison")
    parser.add_argument("--batch-size", type=positive, default=256, help="examples per clean run (and reference batch)")
    parser.add_argument("--max-tokens", type=positive, default=None, help="fast engine token budget (default: from free memory)")
    parser.add_argument("--reference-batch", type=positive, default=None, metavar="N",
                        help="also time the reference on the subset in batches of N prompts (1: one forward per "
                             "prompt, site and layer, as TransformerLens and ROME run)")
    parser.add_argument("--flops", action="store_true",
                        help="only count: the job's FLOPs for the reference and the exact-work floor (any machine, "
                             "seconds; the model is built on the meta device)")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer, width-64 stand-in on any device: checks that the script runs")
    parser.add_argument("--heads", action="store_true",
                        help="the head sweep: one head site at the last position (every head of every layer)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not (args.smoke or args.flops):
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke to check the script on the CPU)")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    import transformers

    from patchmap import activations, synthetic
    from patchmap.builtin import word_tokenizer
    from patchmap.engines.fast.blocks import FastEngine
    from patchmap.interventions import Swap
    from patchmap.job import PatchJob
    from patchmap.patching import run_patch_job
    from patchmap.pairs import make_pairs
    from patchmap.sites import Site

    world = synthetic.make_world(seed=0)
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if args.smoke:
        config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000})
        args.examples, args.subset = min(args.examples, 24), min(args.subset, 8)
    if args.flops:
        if args.heads:
            raise SystemExit("--flops counts the three-site job only; leave out --heads")
        count_only(config, tokenizer, synthetic.facts(world), args)
        return
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    print(f"built a Llama-2-7B-shaped model ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"bf16, {model.config._attn_implementation}) in {time.perf_counter() - start:.0f} s on "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")

    facts = synthetic.facts(world)
    pairs = make_pairs(model, tokenizer, facts, examples=args.examples, seed=0, known_only=False,
                       batch_size=args.batch_size)
    n = pairs.sizes["example"]
    sites = [Site("subj", "Subj.", "resid", "subject"), Site("attn", "Attn.", "attn", "last"),
             Site("last", "Last.", "resid", "last")]
    if args.heads:
        sites = [Site("heads", "Heads@last", "head", "last")]
    per_site = config.num_attention_heads if args.heads else 1  # patched runs per site, prompt and layer
    layers = list(range(config.num_hidden_layers))
    pad = tokenizer.pad_token_id
    start = time.perf_counter()
    acts = activations.extract_activations(model, pairs, sites, layers, args.batch_size, pad, progress=False)
    print(f"{n} pairs, mean prompt {float(pairs['length'].mean()):.1f} tokens; extract stage "
          f"{time.perf_counter() - start:.0f} s")

    def job(pairs, acts, batch_size):
        return PatchJob(model=model, pairs=pairs, sites=sites, layers=layers, batch_size=batch_size, pad_id=pad,
                        intervention=Swap(), sources=acts, progress=False)

    # warm-up (kernels, allocator), then the timed patch stage
    few = slice(0, min(8, n))
    run_patch_job(job(pairs.isel(example=few), acts.isel(example=few), args.batch_size))
    engine = FastEngine(model, max_tokens=args.max_tokens)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fast = run_patch_job(job(pairs, acts, args.batch_size), engine=engine)
    sync()
    seconds = time.perf_counter() - start
    runs = n * len(sites) * len(layers) * per_site
    lengths = pairs["length"].values.astype(float)
    total = fast_flops(model, engine.stats, float((lengths ** 2).sum()))
    floor = None if args.heads else floor_flops(model, pairs["length"].values, pairs["subject_end"].values)
    what = f"{config.num_attention_heads} heads" if args.heads else f"{len(sites)} sites"
    print(f"\nfast engine, patch stage: {n} prompts x {what} x {len(layers)} layers = {runs} runs")
    print(f"  {seconds:.1f} s, {runs / seconds:.0f} patched runs/s, {total / seconds / 1e12:.1f} TFLOP/s achieved "
          f"({total / 1e12:.1f} TFLOP in the schedule), peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else float('nan'):.1f} GiB, token budget {engine.max_tokens}, "
          f"out-of-memory retries {engine.stats['oom_retries']}"
          + ("" if floor is None else f"; the schedule is {total / floor:.2f}x the exact-work floor "
                                      f"({floor / 1e12:.1f} TFLOP)"))

    k = min(args.subset, n)
    sub_pairs, sub_acts = pairs.isel(example=slice(0, k)), acts.isel(example=slice(0, k))
    timings = {}
    runs = [("reference", "reference", args.batch_size), ("fast", "fast", args.batch_size)]
    if args.reference_batch:
        runs.append(("reference, small batches", "reference", args.reference_batch))
    for name, engine_name, batch_size in runs:
        sync()
        start = time.perf_counter()
        result = run_patch_job(job(sub_pairs, sub_acts, batch_size), engine=engine_name)
        sync()
        timings[name] = (time.perf_counter() - start, result)
    difference = max(float(abs(timings["fast"][1][s.name][m] - timings["reference"][1][s.name][m]).max())
                     for s in sites for m in ("js", "p_target_answer", "p_source_answer"))
    sub_runs = k * len(sites) * len(layers) * per_site
    print(f"\nsubset of {k} prompts: reference {timings['reference'][0]:.1f} s, fast {timings['fast'][0]:.1f} s, "
          f"speed-up {timings['reference'][0] / timings['fast'][0]:.1f}x; max |difference| (js, p) {difference:.2e} "
          "(bf16: both engines round differently)")
    if args.reference_batch:
        seconds_small = timings["reference, small batches"][0]
        print(f"subset, reference in batches of {args.reference_batch}: {seconds_small:.1f} s "
              f"({sub_runs / seconds_small:.1f} patched runs/s); the fast engine (batches of {args.batch_size}) "
              f"is {seconds_small / timings['fast'][0]:.1f}x faster")
    js = {s.label: float(fast[s.name]["js"].mean()) for s in sites}
    print(f"mean JS per site (random weights, so only a sanity check): {js}")


def count_only(config, tokenizer, facts, args):
    """The job's FLOPs without running it: the reference engine's full forwards (per site and batch, the
    target and one patched forward per layer, logits at every position) against the exact-work floor."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    sites, layers = 3, config.num_hidden_layers
    for label, examples in (("full job", args.examples), ("reference subset", args.subset)):
        lengths, ends = job_shape(tokenizer, facts, examples, seed=0)
        tokens, squares = padded_batches(lengths, args.batch_size)
        reference = reference_flops(model, sites * (layers + 1), tokens, squares)
        floor = floor_flops(model, lengths, ends)
        print(f"{label}: {len(lengths)} prompts (mean {sum(lengths) / len(lengths):.1f} tokens), batches of "
              f"{args.batch_size}: reference {reference / 1e15:.3f} PFLOP, exact-work floor {floor / 1e15:.4f} "
              f"PFLOP, {reference / floor:.1f}x: the most any exact engine gains over the reference at its FLOP rate")


if __name__ == "__main__":
    main()

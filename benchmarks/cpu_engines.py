"""CPU benchmark: the reference and the fast patching engine on the same job, in one run.

    .venv/bin/python benchmarks/cpu_engines.py                      # GPT-2-small- and Llama-shaped
    .venv/bin/python benchmarks/cpu_engines.py --models llama --examples 8      # a quick look
    .venv/bin/python benchmarks/cpu_engines.py --heads --threads 2  # the head sweep (Llama-shaped)
    .venv/bin/python benchmarks/cpu_engines.py --padding 0,0.25,0.5 --threads 2  # the fast engine's PADDING

Two random-weight models of GPT-2-small shape (12 layers, width 768, 12 heads, MLP 3072) and of Llama shape
(12 layers, width 768, 12 heads, MLP 2048) are built from transformers configs, saved with save_pretrained
and loaded through patchmap.models.load. The job: 32 synthetic swap pairs (the word-level tokenizer of the
built-in world: 9.3 tokens on average, 12 at most, the subject at positions 1 to 3; its ids the first of
the model's vocabulary, 50,257 or 32,000 words; `--vocab 0` shrinks it to the tokenizer's 115), 3 sites
(Subj. = resid at the subject, Attn. = attn at the last token, Last. = resid at the last token), every
layer. Each engine runs in its own process (so peak memory is its own), and the processes take turns: in
each of `--repeat` rounds every engine runs the job once while the others wait, and each engine's fastest
run counts, so that a shared machine's changing load falls on all engines alike. The table gives the
patch-stage time, patched runs per second, the speed-up over the reference, the peak resident memory of
the process and its growth during patching, and checks that the numbers agree. Above it, per model: the FLOPs of the reference, of the fast engine's
schedule and of the exact-work floor (patchmap/engines/flops.py), and where the fast engine's time goes.
If nnsight is importable, the same job is timed with it too (one traced forward per site and layer).

`--heads` times the head sweep instead: every attention head of every layer patched alone at the last
position (a head site, 12 layers x 12 heads) on the Llama-shaped model's 32 swap pairs, by the fast engine
and by the reference engine (batches of all prompts), and by the batch-1 hook loop on the first
`--loop-examples` prompts: one hooked forward per prompt, layer and head, the way TransformerLens'
get_act_patch_attn_head_out_by_pos patches (its cost per run does not depend on how many prompts there
are). The three take turns as above. The table gives patched runs per second and the fast engine's ratio to
each, and checks that the three agree.

`--padding P,P,...` times the fast engine alone on the job with each value of schedule.PADDING (the share
of padded positions up to which runs of different widths share block calls), the values alternating in
one process so that the machine's load falls on each alike.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cli import non_negative, positive
from patchmap.engines.flops import fast_flops, floor_flops, output_embedding_rows, padded_batches, reference_flops

SITES = {
    "subj": {"label": "Subj.", "component": "resid", "positions": "subject"},
    "attn": {"label": "Attn.", "component": "attn", "positions": "last"},
    "last": {"label": "Last.", "component": "resid", "positions": "last"},
}
SHAPES = {
    "gpt2": "GPT-2-small shape: 12 layers, width 768, 12 heads, MLP 3072",
    "llama": "Llama shape: 12 layers, width 768, 12 heads (4 key/value), MLP 2048",
}
VOCABULARY = {"gpt2": 50257, "llama": 32000}
PROTOCOL = "@@ "  # starts the lines a worker answers the main process with (libraries may print others)
HEAD_SITES = {"heads": {"label": "Heads@last", "component": "head", "positions": "last"}}


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(kind, directory, vocab):
    import torch
    import transformers

    from patchmap import synthetic
    from patchmap.builtin import word_tokenizer

    world = synthetic.make_world(seed=0)
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    size = max(VOCABULARY[kind] if vocab is None else vocab, len(tokenizer))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=size, n_embd=768, n_layer=12, n_head=12, n_positions=128, **ids)
    else:
        config = transformers.LlamaConfig(vocab_size=size, hidden_size=768, intermediate_size=2048,
                                          num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                          max_position_embeddings=128, tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return size


def _job(directory, examples, site_specs=SITES):
    from patchmap import activations, models, synthetic
    from patchmap.pairs import make_pairs
    from patchmap.sites import Site

    model, tokenizer = models.load(directory)
    facts = synthetic.facts(synthetic.make_world(seed=0))
    pairs = make_pairs(model, tokenizer, facts, examples=examples, seed=0, known_only=False)
    sites = [Site.from_config(k, v) for k, v in site_specs.items()]
    layers = list(range(models.n_layers(model)))
    acts = activations.extract_activations(model, pairs, sites, layers, examples, tokenizer.pad_token_id, False)
    return model, tokenizer, pairs, sites, layers, acts


def swap_job(model, pad_id, pairs, sites, layers, acts, batch_size):
    """The benchmarks' PatchJob: swap patching of `pairs` at `sites` and `layers`, batches of `batch_size`."""
    from patchmap.interventions import Swap
    from patchmap.job import PatchJob

    return PatchJob(model=model, pairs=pairs, sites=sites, layers=layers, batch_size=batch_size, pad_id=pad_id,
                    intervention=Swap(), sources=acts, progress=False)


def worker(directory, engine, examples, out):
    """One engine on the job, in turns that interleaved() gives: after a warm-up on 4 examples it says
    ready, then runs the job once for every `run` line on its standard input (answering each with its
    time); at the end of the input it writes its metrics (npz) and a line with its fastest time, memory and
    counters. Protocol lines start with PROTOCOL."""
    import torch

    from patchmap.engines.fast.blocks import FastEngine
    from patchmap.patching import run_patch_job

    model, tokenizer, pairs, sites, layers, acts = _job(directory, examples)

    def job(pairs, acts, batch_size):
        return swap_job(model, tokenizer.pad_token_id, pairs, sites, layers, acts, batch_size)

    def run(pairs, acts):
        if engine == "nnsight":
            return nnsight_patch(model, pairs, acts, sites, layers, tokenizer.pad_token_id), {}
        if engine == "fast":
            fast = FastEngine(model)
            return run_patch_job(job(pairs, acts, examples), engine=fast), dict(fast.stats)
        batch = int(engine.split("@")[1]) if "@" in engine else examples  # reference@N: batches of N
        return run_patch_job(job(pairs, acts, batch), engine="reference"), {}

    few = slice(0, min(4, examples))
    run(pairs.isel(example=few), acts.isel(example=few))  # warm-up: first calls of kernels, lazy weights
    before = _rss_mb()
    times, (results, extra) = take_turns(lambda: run(pairs, acts))
    seconds = min(times)
    phases = fast_phases(model, pairs, acts, sites, layers, examples, tokenizer.pad_token_id) if engine == "fast" else {}
    np.savez(out, **{f"{s}:{k}": results[s][k].values for s in results for k in ("js", "kl_patched_target",
                                                                                   "p_source_answer")})
    runs = len(pairs["example"]) * len(sites) * len(layers)
    # block x position evaluations: the reference runs, per site and batch, the target and one patched
    # forward per layer over the padded batch; the fast engine's are counted by the engine
    lengths = pairs["length"].values
    padded, padded_sq = padded_batches([int(n) for n in lengths], examples)
    reference_work = len(sites) * (len(layers) + 1) * padded * len(layers)
    reference_tflop = reference_flops(model, len(sites) * (len(layers) + 1), padded, padded_sq) / 1e12
    floor_tflop = floor_flops(model, lengths, pairs["subject_end"].values) / 1e12
    fast_tflop = fast_flops(model, extra, float((lengths.astype(float) ** 2).sum())) / 1e12 if extra else None
    fast_work = extra.get("block_tokens", 0) + extra.get("clean_tokens", 0) * len(layers)
    mlp_work = extra.get("mlp_tokens", 0) + extra.get("clean_mlp_tokens", 0)
    print(PROTOCOL + json.dumps({"engine": engine, "seconds": seconds, "times": times, "runs": runs,
                                 "peak_mb": _rss_mb(), "before_mb": before, "threads": torch.get_num_threads(),
                                 "stats": extra, "prompt_tokens": float(pairs["length"].mean()),
                                 "reference_work": reference_work, "fast_work": fast_work, "mlp_work": mlp_work,
                                 "phases": phases, "reference_tflop": reference_tflop, "fast_tflop": fast_tflop,
                                 "floor_tflop": floor_tflop}))


def take_turns(run):
    """A worker's side of interleaved(): says it is ready, then calls run() once for every line on its
    standard input, answering each with the seconds it took. Returns (the times, run()'s last result)."""
    print(PROTOCOL + "ready", flush=True)
    times, result = [], None
    for _ in sys.stdin:
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        print(PROTOCOL + json.dumps(times[-1]), flush=True)
    return times, result


def interleaved(commands: dict, repeat: int, cwd) -> dict:
    """Start a worker process per engine ({engine: command line}), then time them in turns: `repeat` rounds
    in which each engine runs the job once while the others wait, so that a shared machine's changing load
    falls on every engine alike (the engines' speed-up is a ratio of times taken minutes apart). Returns
    {engine: the worker's last line, parsed} for the workers that finished; prints the failures."""
    def answer(engine):
        for line in processes[engine].stdout:
            if line.startswith(PROTOCOL):
                text = line[len(PROTOCOL):].strip()
                return text if text == "ready" else json.loads(text)
        return None  # the worker ended without answering

    with tempfile.TemporaryDirectory() as logs:
        log_of = {engine: os.path.join(logs, f"{engine}.log") for engine in commands}
        processes = {}
        for engine, command in commands.items():
            with open(log_of[engine], "w") as log:  # the child keeps its own copy of the file
                processes[engine] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     stderr=log, text=True, cwd=cwd)
        alive = [engine for engine in commands if answer(engine) == "ready"]
        for _ in range(repeat):
            for engine in list(alive):
                processes[engine].stdin.write("run\n")
                processes[engine].stdin.flush()
                if answer(engine) is None:
                    alive.remove(engine)
        finished = {}
        for engine, process in processes.items():
            if engine in alive:
                process.stdin.close()
                finished[engine] = answer(engine)
            process.wait()
            if finished.get(engine) is None:
                finished.pop(engine, None)
                print(f"  {engine}: failed\n{Path(log_of[engine]).read_text()[-2000:]}")
    return finished


def fast_phases(model, pairs, acts, sites, layers, examples, pad_id):
    """Where the fast engine's time goes: one more pass with timers around its phases (the clean run, the
    source keys and values of subject spans, the patched block calls by kind of run, the output embedding
    and metrics). Seconds per phase."""
    from patchmap.engines.fast import driver, runs
    from patchmap.engines.fast.blocks import FastEngine
    from patchmap.patching import run_patch_job

    engine = FastEngine(model)
    seconds = {}

    def timed(name_of, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                name = name_of(*args, **kwargs)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    def run_kind(engine, clean, group, layer_ids, layers, edit, *rest):
        if group.span:
            return "patched blocks: resid span (Subj.), positions after it"
        return f"patched blocks: {edit.component} at {'one position' if group.width == 1 else 'several positions'}"

    engine.clean_run = timed(lambda *a, **k: "clean run (model forward, all positions)", engine.clean_run)
    engine.span_keys_values = timed(lambda *a, **k: "source keys/values of subject spans", engine.span_keys_values)
    run_group, score = runs.run_group, driver.score
    runs.run_group = timed(run_kind, run_group)
    driver.score = timed(lambda *a, **k: "output embedding + metrics (all runs)", score)
    try:
        start = time.perf_counter()
        run_patch_job(swap_job(model, pad_id, pairs, sites, layers, acts, examples), engine=engine)
        seconds["total"] = time.perf_counter() - start
    finally:
        runs.run_group, driver.score = run_group, score
    return seconds


def nnsight_patch(model, pairs, acts, sites, layers, pad_id):
    """The same job with nnsight: one traced forward per (site, layer), the batch's source activation
    written into the module's output. Metrics computed as the engines do."""
    import torch
    from nnsight import NNsight

    from patchmap import models
    from patchmap.engines.hooks import last_logprobs, pad_batch, position_mask
    from patchmap.engines.strategies import reference_source_values
    from patchmap.metrics import Targets, patch_metrics
    from patchmap.encoding import token_lists
    from patchmap.sites import site_positions

    wrapped = NNsight(model)
    targets = token_lists(pairs, "target_ids")
    ids, mask, pos, lengths = pad_batch(targets, pad_id, "cpu")
    target = Targets(last_logprobs(model, ids, mask, pos, lengths))
    rows = torch.arange(len(targets))
    answers = [torch.as_tensor(pairs[f"{r}_answer"].values) for r in ("target", "source")]
    layout = models.layout_for(model)
    results = {}
    for site in sites:
        where = site_positions(pairs, site)
        patch_mask = position_mask(where, ids.shape[1], "cpu")
        values = reference_source_values(acts, site, where, ids.shape[1], model.config.hidden_size, 0, len(targets))
        per_layer = []
        for layer in layers:
            envoy = wrapped
            for part in layout.blocks.split("."):
                envoy = getattr(envoy, part)
            envoy = envoy[layer]
            if site.component != "resid":
                envoy = getattr(envoy, getattr(layout, site.component))
            with torch.no_grad(), wrapped.trace(input_ids=ids, attention_mask=mask, position_ids=pos):
                output = envoy.output
                hidden = output[0] if isinstance(output, tuple) else output
                hidden[patch_mask] = values[layer][patch_mask]
                logits = wrapped.output.logits.save()
            last = torch.log_softmax(logits[torch.arange(len(lengths)), lengths - 1].float(), -1)
            per_layer.append(patch_metrics(last, target, rows, *answers))
        results[site.name] = {k: _Values(torch.stack([m[k] for m in per_layer], 1).numpy()) for k in per_layer[0]}
    return results


class _Values:
    def __init__(self, values):
        self.values = values


def hook_loop(model, pairs, acts, site, layers, pad_id):
    """The head sweep one hooked forward at a time: per prompt, its unpatched forward, then for each layer and
    head a forward whose output projection gets the source's slice of that head at the last position (a
    pre-hook on its input, as TransformerLens hooks hook_z). Returns js [prompt, layer, head]."""
    import torch

    from patchmap import models
    from patchmap.encoding import token_lists
    from patchmap.engines.hooks import hooks, last_logprobs, pad_batch
    from patchmap.metrics import Targets, patch_metrics

    heads, head_dim = models.head_shape(model)
    out = np.zeros((pairs.sizes["example"], len(layers), heads), np.float32)
    answers = [torch.as_tensor(pairs[f"{r}_answer"].values) for r in ("target", "source")]
    for e, ids in enumerate(token_lists(pairs, "target_ids")):
        batch = pad_batch([ids], pad_id, "cpu")
        target = Targets(last_logprobs(model, *batch))
        for li, layer in enumerate(layers):
            source = torch.from_numpy(acts[f"act_{site.name}"].values[e, li, 0])  # [heads x head dim]
            for head in range(heads):
                part = slice(head * head_dim, (head + 1) * head_dim)

                def write(module, args, kwargs, part=part):
                    x = args[0].clone()
                    x[0, -1, part] = source[part]
                    return (x, *args[1:]), kwargs
                with torch.no_grad(), hooks([(models.component_module(model, "head", layer), write, "pre")]):
                    patched = last_logprobs(model, *batch)
                out[e, li, head] = patch_metrics(patched, target, torch.zeros(1, dtype=torch.long),
                                                answers[0][e:e + 1], answers[1][e:e + 1])["js"][0]
    return out


def padding_worker(directory, examples, values, rounds):
    """The fast engine on the job with each value of schedule.PADDING in turn, `rounds` times over (so that
    the machine's load falls on every value alike); prints the fastest and the median time of each."""
    from patchmap.engines.fast import schedule
    from patchmap.engines.fast.blocks import FastEngine
    from patchmap.patching import run_patch_job

    model, tokenizer, pairs, sites, layers, acts = _job(directory, examples)

    def run():
        start = time.perf_counter()
        run_patch_job(swap_job(model, tokenizer.pad_token_id, pairs, sites, layers, acts, examples),
                      engine=FastEngine(model))
        return time.perf_counter() - start

    run()  # warm-up
    times = {value: [] for value in values}
    for _ in range(rounds):
        for value in values:
            schedule.PADDING = value
            times[value].append(run())
    for value, seconds in times.items():
        seconds = sorted(seconds)
        print(f"  PADDING {value:g}: fastest {seconds[0]:.2f} s, median {seconds[len(seconds) // 2]:.2f} s "
              f"({rounds} runs)", flush=True)


def head_worker(directory, engine, examples, out, loop_examples):
    """One way of running the head sweep, in turns that interleaved() gives: `fast` or `reference` on every
    prompt, `loop` (hook_loop) on the first `loop_examples`; writes js [prompt, layer, head] (npy) and a
    line with its fastest time."""
    import torch

    from patchmap import models
    from patchmap.engines.fast.blocks import FastEngine
    from patchmap.patching import run_patch_job

    model, tokenizer, pairs, sites, layers, acts = _job(directory, examples, HEAD_SITES)
    if engine == "loop":
        pairs, acts = pairs.isel(example=slice(0, loop_examples)), acts.isel(example=slice(0, loop_examples))

    def run(pairs, acts):
        if engine == "loop":
            return hook_loop(model, pairs, acts, sites[0], layers, tokenizer.pad_token_id)
        job = swap_job(model, tokenizer.pad_token_id, pairs, sites, layers, acts, pairs.sizes["example"])
        return run_patch_job(job, engine=FastEngine(model) if engine == "fast" else "reference")["heads"]["js"].values

    run(pairs.isel(example=[0]), acts.isel(example=[0]))  # warm-up
    times, js = take_turns(lambda: run(pairs, acts))
    np.save(out, js)
    print(PROTOCOL + json.dumps({"engine": engine, "seconds": min(times), "prompts": int(pairs.sizes["example"]),
                                 "runs": int(js.size), "heads": models.head_shape(model)[0], "layers": len(layers),
                                 "threads": torch.get_num_threads()}))


def head_sweep(args, root):
    """The head sweep on the Llama-shaped model: the fast engine, the reference and the batch-1 hook loop."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "llama")
        vocabulary = build("llama", directory, args.vocab)
        print(f"llama: {SHAPES['llama']}, vocabulary {vocabulary:,}; every head of every layer at the last "
              f"position", flush=True)
        out = {engine: os.path.join(tmp, f"{engine}.npy") for engine in ("fast", "reference", "loop")}
        rows = interleaved({engine: [sys.executable, __file__, "--threads", str(args.threads), "--head-worker",
                                     directory, engine, str(args.examples), path, str(args.loop_examples)]
                            for engine, path in out.items()}, args.repeat, root)
        for engine, m in rows.items():
            m["js"] = np.load(out[engine])
            print(f"  {engine}: {m['seconds']:.1f} s for {m['runs']} runs", flush=True)
    fast = rows.get("fast")
    print(f"\nhead sweep: {args.examples} prompts x {fast['layers'] if fast else '?'} layers x "
          f"{fast['heads'] if fast else '?'} heads at the last position; torch threads: "
          f"{next(iter(rows.values()))['threads'] if rows else '?'}\n")
    print("| engine | prompts | patched runs | seconds | patched runs/s | fast engine's speed-up | max abs diff (js) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    reference = rows.get("reference")
    for engine, m in rows.items():
        rate = m["runs"] / m["seconds"]
        speedup = fast["runs"] / fast["seconds"] / rate if fast else float("nan")
        agree = "-"
        if reference is not None and engine != "reference":
            agree = f"{float(np.abs(m['js'] - reference['js'][:m['prompts']]).max()):.1e}"
        print(f"| {'batch-1 hook loop' if engine == 'loop' else engine} | {m['prompts']} | {m['runs']} | "
              f"{m['seconds']:.2f} | {rate:.0f} | {speedup:.1f}x | {agree} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--examples", type=positive, default=32)
    parser.add_argument("--vocab", type=non_negative, default=None,
                        help="vocabulary size (default: the shape's, 50,257 and 32,000; 0: the tokenizer's)")
    parser.add_argument("--threads", type=non_negative, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=positive, default=None,
                        help="rounds of timed runs, each engine once per round in turn; the fastest counts "
                             "(default 3; the head sweep: 2)")
    parser.add_argument("--reference-batch", type=positive, default=None, metavar="N",
                        help="also time the reference engine in batches of N prompts (1: one forward per prompt, "
                             "site and layer, as TransformerLens' generic_activation_patch and ROME's causal "
                             "tracing run); the speed-up column stays relative to the reference over all prompts")
    parser.add_argument("--heads", action="store_true",
                        help="the head sweep on the Llama-shaped model instead (see above)")
    parser.add_argument("--loop-examples", type=positive, default=4,
                        help="prompts the batch-1 hook loop of the head sweep runs (its cost per run is the same "
                             "for any number)")
    parser.add_argument("--worker", nargs=4, metavar=("DIR", "ENGINE", "EXAMPLES", "OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--padding", metavar="P,P,...", default=None,
                        help="instead: time the fast engine with each of these values of schedule.PADDING (the "
                             "share of padded positions up to which runs of different widths share block calls), "
                             "alternating in one process, --repeat x 2 runs each")
    parser.add_argument("--head-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--padding-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeat = args.repeat or (2 if args.heads else 3)
    if args.threads and (args.worker or args.head_worker or args.padding_worker):
        import torch
        torch.set_num_threads(args.threads)
    if args.padding_worker:
        directory, examples, values, rounds = args.padding_worker
        padding_worker(directory, int(examples), [float(v) for v in values.split(",")], int(rounds))
        return
    if args.head_worker:
        directory, engine, examples, out, loop_examples = args.head_worker
        head_worker(directory, engine, int(examples), out, int(loop_examples))
        return
    root = Path(__file__).resolve().parent.parent
    if args.heads:
        head_sweep(args, root)
        return
    if args.worker:
        directory, engine, examples, out = args.worker
        worker(directory, engine, int(examples), out)
        return
    if args.padding:
        with tempfile.TemporaryDirectory() as tmp:
            for kind in args.models.split(","):
                directory = os.path.join(tmp, kind)
                build(kind, directory, args.vocab)
                print(f"{kind}: {SHAPES[kind]}; the fast engine with each PADDING in turn", flush=True)
                subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--padding-worker",
                                directory, str(args.examples), args.padding, str(2 * args.repeat)], cwd=root,
                               check=True)
        return
    try:
        import nnsight  # noqa: F401
        engines = ["reference", "fast", "nnsight"]
    except ImportError:
        engines = ["reference", "fast"]
        print("nnsight is not installed: timing the reference and the fast engine only")
    if args.reference_batch:
        engines.append(f"reference@{args.reference_batch}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            directory = os.path.join(tmp, kind)
            vocabulary = build(kind, directory, args.vocab)
            print(f"{kind}: {SHAPES[kind]}, vocabulary {vocabulary:,}", flush=True)
            out = {engine: os.path.join(tmp, f"{kind}-{engine}.npz") for engine in engines}
            measured = interleaved({engine: [sys.executable, __file__, "--threads", str(args.threads), "--worker",
                                             directory, engine, str(args.examples), out[engine]]
                                    for engine in engines}, args.repeat, root)
            for engine, m in measured.items():
                m["metrics"] = dict(np.load(out[engine]))
                print(f"  {engine}: {m['seconds']:.1f} s (fastest of {', '.join(f'{t:.1f}' for t in m['times'])})",
                      flush=True)
            reference = measured.get("reference")
            for engine, m in measured.items():
                agree = "-"
                if reference and engine != "reference":
                    agree = max(float(np.abs(m["metrics"][k] - reference["metrics"][k]).max()) for k in m["metrics"])
                    agree = f"{agree:.1e}"
                ratio = reference["seconds"] / m["seconds"] if reference else float("nan")
                rows.append((kind, engine, m["seconds"], m["runs"] / m["seconds"], ratio, m["peak_mb"],
                             m["peak_mb"] - m["before_mb"], agree))
            if "fast" in measured:
                m = measured["fast"]
                print(f"  block x position evaluations: reference {m['reference_work']}, fast {m['fast_work']} "
                      f"(of which {m['mlp_work']} through the MLP; {m['stats'].get('block_calls', 0)} block calls, "
                      f"{output_embedding_rows(m['stats'])} output-embedding rows): "
                      f"{m['reference_work'] / m['fast_work']:.1f}x fewer; mean prompt {m['prompt_tokens']:.1f} tokens")
                ref = measured.get("reference")
                if ref:
                    rate = ref["reference_tflop"] / ref["seconds"]
                    print(f"  FLOPs: reference {ref['reference_tflop']:.2f} TFLOP at {1000 * rate:.0f} GFLOP/s; fast "
                          f"{m['fast_tflop']:.3f} TFLOP at {1000 * m['fast_tflop'] / m['seconds']:.0f} GFLOP/s, "
                          f"{ref['reference_tflop'] / m['fast_tflop']:.1f}x fewer: at the reference's FLOP rate "
                          f"the fast engine would take {m['fast_tflop'] / rate:.2f} s")
                    print(f"  exact-work floor (flops.floor_flops): {m['floor_tflop']:.3f} TFLOP, "
                          f"{ref['reference_tflop'] / m['floor_tflop']:.1f}x fewer than the reference: the most "
                          f"any exact engine gains at the reference's FLOP rate; the fast engine's schedule is "
                          f"{m['fast_tflop'] / m['floor_tflop']:.2f}x the floor")
                    ideal = ref["reference_tflop"] / m["floor_tflop"]
                    speedup = ref["seconds"] / m["seconds"]
                    print(f"  speed-up {speedup:.2f}x; floor-bound ideal (reference FLOPs / floor FLOPs) {ideal:.2f}x: "
                          f"the fast engine at {100 * speedup / ideal:.1f}% of it")
                for name, other in measured.items():
                    if name.startswith("reference@"):
                        print(f"  fast engine vs {name} (the reference in batches of {name.split('@')[1]}): "
                              f"{other['seconds'] / m['seconds']:.1f}x")
                phases = m["phases"]
                print(f"  fast engine, where the time goes (one more pass, {phases['total']:.2f} s):")
                for name, value in sorted(phases.items(), key=lambda kv: -kv[1]):
                    if name != "total":
                        print(f"    {value:6.2f} s  {100 * value / phases['total']:3.0f}%  {name}")
    threads = next(iter(measured.values()))["threads"] if measured else "?"
    print(f"\n{args.examples} prompts x {len(SITES)} sites x every layer; torch threads: {threads}\n")
    print("| model | engine | seconds | patched runs/s | speed-up | peak RSS MB | RSS growth MB | max abs diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, engine, seconds, rate, ratio, peak, growth, agree in rows:
        print(f"| {kind} | {engine} | {seconds:.2f} | {rate:.0f} | {ratio:.1f}x | {peak:.0f} | {growth:.0f} | {agree} |")


if __name__ == "__main__":
    main()

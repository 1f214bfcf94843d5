"""Token traces of single prompts (ROME's causal trace, Meng et al. 2022, Figure 1): for one fact, each
component restored (noise) or patched (swap) at each token and each layer (for a window of layers, its
centre), with the JS divergence and p(answer) of every cell.

The engines do the work: every token of the prompt is one example of a patch job (the same prompt each
time) whose site is that example's own token (sites.TRACED), so a cell (component, token, layer) is the
run's cell (example = token, layer) of a site at that single position. Noise runs each example in
`noise_samples` copies and compares the copies' mean distributions (patchmap.engines.samples), as ROME
averages its corrupted copies. The noise of fact number i of a trace is that of example i of a run with the
same seed, scaled by the std of the subject embeddings of the trace's dataset (`noise_facts`)."""

from dataclasses import dataclass, fields

import numpy as np
import torch
import xarray as xr

from . import models
from .activations import extract_activations
from .config import js_base
from .encoding import drop_too_long, encode_facts, max_positions
from .engines.hooks import hooks, last_logprobs, noise_hooks, pad_batch
from .engines.samples import copies, mean_distribution
from .errors import UserError
from .interventions import from_run
from .job import PatchJob
from .patching import run_patch_job
from .predictions import std_from_moments, subject_embedding_moments
from .quantities import DESCRIPTIONS, METRICS, unit
from .sites import TRACED, Site


@dataclass(frozen=True)
class TraceSettings:
    """A trace's settings: a `traces` entry of a validated config (or the Python API's arguments)."""
    intervention: str     # noise or swap
    components: tuple     # of resid, mlp, attn: a panel each
    window: dict          # component -> layers patched together per column
    noise_scale: float
    noise_samples: int
    seed: int
    batch_size: int       # examples (token positions) per clean run
    js_base: object       # 2 or "e"
    engine: str

    @classmethod
    def from_spec(cls, spec: dict) -> "TraceSettings":
        return cls(**{f.name: spec[f.name] for f in fields(cls)})

    @property
    def base(self) -> float:
        """The logarithms' base of the divergences (2 or e)."""
        return js_base({"js_base": self.js_base})

    def intervention_object(self):
        return from_run({"intervention": self.intervention, "noise_scale": self.noise_scale,
                         "noise_samples": self.noise_samples, "pairing": "subject", "value": "mean"})


def noise_std(model, tokenizer, noise_facts: list) -> float:
    """The std of the subject tokens' input embeddings over `noise_facts`, as a run's pairs compute it."""
    encoded, _ = encode_facts(tokenizer, noise_facts, "drop")
    encoded, _ = drop_too_long(encoded, max_positions(model.config))
    subject_embedding_moments(model, encoded)
    return std_from_moments(encoded)


def token_examples(target: dict, source: dict, variables: dict, attributes: dict) -> xr.Dataset:
    """The patch job's pairs: one example per token of the target's prompt (target and source: encoded
    facts of the same length), each with that token as its `traced_position`; `variables` and `attributes`:
    what the intervention records (noise: the seed and std), for one example, repeated."""
    length = len(target["ids"])
    span = target["span"]
    each = np.zeros(length, dtype=np.int64)
    data = {"target_ids": (("example", "token"), np.tile(np.asarray(target["ids"], np.int32), (length, 1))),
            "source_ids": (("example", "token"), np.tile(np.asarray(source["ids"], np.int32), (length, 1))),
            "length": (("example",), np.full(length, length, np.int32)),
            "subject_start": (("example",), np.full(length, span[0], np.int32)),
            "subject_end": (("example",), np.full(length, span[1], np.int32)),
            "target_answer": (("example",), np.full(length, target["answer"], np.int64)),
            "source_answer": (("example",), np.full(length, source["answer"], np.int64)),
            "traced_position": (("example",), np.arange(length, dtype=np.int32))}
    for name, (dims, values, attrs) in variables.items():
        data[name] = (dims, np.asarray(values)[each], attrs)
    return xr.Dataset(data, coords={"example": [f"{target['id']}@{t}" for t in range(length)]}, attrs=attributes)


@torch.no_grad()
def trace_fact(model, tokenizer, fact: dict, source: dict, settings: TraceSettings, noise_facts: list,
               index: int = 0, progress: bool = True) -> xr.Dataset:
    """The trace of `fact` (a dict with id, subject, prompt, attribute) under the settings' intervention:
    js, ... (component, token, layer), p_answer_unpatched and p_answer_corrupted. `source` (swap): the fact
    patched in; `noise_facts`: the facts whose subject embeddings' std scales the noise; `index`: the
    fact's number in its trace (its noise seed)."""
    # 1. the fact (and its source) as the model sees them; the intervention's noise or source
    encoded, _ = encode_facts(tokenizer, [fact] + ([source] if source else []), "error")
    target, patched_in = encoded[0], encoded[-1]
    limit = max_positions(model.config)
    if limit is not None and len(target["ids"]) > limit:
        raise UserError(f"fact {fact['id']}: its prompt has {len(target['ids'])} tokens, more than the model's "
                        f"{limit} positions")
    if len(patched_in["ids"]) != len(target["ids"]):
        raise UserError(f"fact {fact['id']}: its source {source['id']} has {len(patched_in['ids'])} tokens and the "
                        f"fact {len(target['ids'])}; a swap trace needs prompts of the same token length")
    intervention = settings.intervention_object()
    variables, attributes = intervention.pairs_fields(settings.seed, index + 1,
                                                      lambda: noise_std(model, tokenizer, noise_facts))
    pairs = token_examples(target, patched_in, {k: (d, v[index:index + 1], a) for k, (d, v, a) in variables.items()},
                           attributes)
    # 2. the sources at every layer, then each component: one job per window, every token an example
    layers = list(range(models.n_layers(model)))
    sites = {c: Site(c, c, c, TRACED) for c in settings.components}
    pad = tokenizer.pad_token_id
    sources = intervention.sources(pairs, lambda: extract_activations(model, pairs, list(sites.values()), layers,
                                                                      settings.batch_size, pad, progress))
    results = {}
    for window in sorted({settings.window[c] for c in settings.components}):
        job = PatchJob(model=model, pairs=pairs, sites=[s for c, s in sites.items() if settings.window[c] == window],
                       layers=layers, batch_size=settings.batch_size, pad_id=pad, intervention=intervention,
                       sources=sources, js_base=settings.base, window=window, progress=progress)
        results.update(run_patch_job(job, engine=settings.engine))
    # 3. p(answer) of the unpatched prompt and of the prompt under the intervention everywhere
    unpatched, corrupted = answer_probabilities(model, pairs, intervention, pad)
    # 4. the dataset
    return trace_dataset(tokenizer, fact, source, target, settings, results, layers, unpatched, corrupted, pairs)


def answer_probabilities(model, pairs: xr.Dataset, intervention, pad: int) -> tuple:
    """p(answer) of the target's own clean prompt, and under the intervention everywhere: the noised prompt
    (its copies' mean distribution) or the source's prompt."""
    device = models.input_device(model)
    one = pairs.isel(example=[0])
    answer, length = int(one["target_answer"].values[0]), int(one["length"].values[0])
    target, source = ([one[f"{role}_ids"].values[0, :length].tolist()] for role in ("target", "source"))
    clean = float(last_logprobs(model, *pad_batch(target, pad, device))[0, answer].exp())
    if not intervention.adds_noise:
        return clean, float(last_logprobs(model, *pad_batch(source, pad, device))[0, answer].exp())
    noise = intervention.target_noise(one, 0, 1, length, model.config.hidden_size)
    with hooks(noise_hooks(model, noise.to(device))):
        noised = last_logprobs(model, *pad_batch(copies(target, intervention.samples), pad, device))
    return clean, float(mean_distribution(noised, intervention.samples)[0, answer].exp())


def trace_dataset(tokenizer, fact, source, target, settings, results, layers, unpatched, corrupted, pairs):
    """The trace's dataset: every metric (component, token, layer), the decoded tokens and the subject's
    flags as coordinates, the two reference probabilities, and what the trace was made with."""
    components = list(settings.components)
    data = {k: (("component", "token", "layer"), np.stack([results[c][k].values for c in components]),
                {"description": DESCRIPTIONS[k], "units": unit(k, settings.js_base)}) for k in METRICS}
    data["p_answer_unpatched"] = ((), unpatched, {"description": "probability of the answer after the fact's own "
                                                  "prompt, nothing patched", "units": "probability"})
    data["p_answer_corrupted"] = ((), corrupted, {
        "description": "probability of the answer with the intervention everywhere: the noised prompt (mean over "
                       "the noise samples) or the source's prompt", "units": "probability"})
    start, end = target["span"]
    length = len(target["ids"])
    coords = {"component": components, "window": ("component", [settings.window[c] for c in components]),
              "token": np.arange(length), "layer": np.asarray(layers),
              "token_text": ("token", [tokenizer.decode([t]) for t in target["ids"]]),
              "subject": ("token", np.array([start <= t < end for t in range(length)]))}
    ds = xr.Dataset(data, coords=coords)
    for name, description in (("component", "what is patched: resid, mlp or attn output (as a site's component)"),
                              ("window", "layers patched together per column, the column's layer their centre"),
                              ("token", "token position in the prompt, 0 = first"),
                              ("token_text", "the token, decoded"), ("subject", "whether the token is the subject's"),
                              ("layer", "decoder block index, 0 = first (for a window: its centre)")):
        ds[name].attrs["description"] = description
    ds.attrs.update({"title": f"token trace of fact {fact['id']}: {settings.intervention}", "fact": str(fact["id"]),
                     "prompt": fact["prompt"], "subject": fact["subject"], "attribute": fact["attribute"],
                     "answer": tokenizer.decode([target["answer"]]), "intervention": settings.intervention,
                     "js_base": str(settings.js_base), "seed": settings.seed, "engine": settings.engine})
    if source is not None:
        ds.attrs.update({f"source_{k}": str(source[k]) for k in ("id", "prompt", "subject", "attribute")})
    if settings.intervention == "noise":
        ds.attrs.update({"noise_scale": float(settings.noise_scale), "noise_samples": settings.noise_samples,
                         "noise_std": pairs.attrs["noise_std"], "noise_seed": int(pairs["noise_seed"].values[0])})
    return ds

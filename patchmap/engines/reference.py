"""The reference engine: forward hooks on the model's own modules, one full forward per (site, layer),
batched over examples. Simple and slow; the fast engine is tested against it."""

import numpy as np
import torch
from tqdm.auto import tqdm

from ..job import window_layers
from ..metrics import patch_metrics
from ..quantities import METRICS
from ..models import attention_module, blocks, component_module, input_device
from ..pairs import token_lists
from ..sites import site_positions
from .hooks import hooks, knockout_hook, last_logprobs, noise_hooks, pad_batch, position_mask, replace_hook
from .memory import halve_range, halving_on_out_of_memory


def patch(job):
    """{site name: per-example metrics [example, layer]} for every site of the PatchJob `job`."""
    return {site.name: site_metrics(job, site) for site in job.sites}


@torch.no_grad()
def site_metrics(job, site):
    """One site's metrics: the source activation patched into the target (or, for knockout, the last
    position's attention to the site's positions blocked) in the window around each layer, batch by
    batch; a batch that runs out of memory is halved."""
    targets = token_lists(job.pairs, "target_ids")
    pos = site_positions(job.pairs, site)
    hidden = job.model.config.hidden_size
    writes = job.intervention.writes_sources

    def run(batch):
        a, b = batch
        width = max(len(t) for t in targets[a:b])
        values = source_values(job.sources, site, pos, width, hidden, a, b) if writes else None
        noise = job.intervention.target_noise(job.pairs, a, b, width, hidden)
        return patch_batch(job.model, site, job.layers, targets[a:b], pos[a:b], values,
                           job.pairs["target_answer"].values[a:b], job.pairs["source_answer"].values[a:b],
                           job.pad_id, job.js_base, None if noise is None else noise.to(input_device(job.model)),
                           window=job.window, knockout=not writes)

    batches = tqdm(job.batches(), desc=f"patch {site.label}", unit="batch", disable=not job.progress)
    parts = [metrics for _, metrics in halving_on_out_of_memory(
        batches, run, halve_range, lambda batch: f"patching examples {batch[0]}-{batch[1] - 1} at site {site.label}")]
    metrics = {k: np.concatenate([p[k].numpy() for p in parts]) if parts else np.zeros((0, len(job.layers)), np.float32)
               for k in METRICS}
    return job.site_result(site, metrics)


def source_values(acts, site, pos, width, hidden, a, b):
    """[B, T, H] tensors per extracted layer with the source activation at each example's site positions."""
    arr = acts[f"act_{site.name}"].values[a:b]  # [B, layer, slot, H]
    values = {}
    for li, layer in enumerate(acts["layer"].values.tolist()):
        v = torch.zeros(b - a, width, hidden)
        for i, ps in enumerate(pos[a:b]):
            v[i, ps] = torch.from_numpy(arr[i, li, :len(ps)])
        values[layer] = v
    return values


@torch.no_grad()
def patch_batch(model, site, layers, target_ids, position_lists, source_values, target_answer,
                source_answer, pad_id, base=2.0, target_noise=None, window=1, knockout=False):
    """Metrics for one batch of examples at one site, every layer in `layers`.

    For each layer l the target runs with the source activation written in at the site's positions in
    every layer of window_layers(l, window); `source_values[layer]` is a [B, T, H] tensor holding it
    (anything elsewhere). With `knockout`, the target instead runs with the attention edges from its last
    position to the site's positions blocked in those layers (source_values unused). `target_noise`
    [B, T, H], if given, is added to the target's input embeddings in every target run, patched or not.
    Returns {metric: [B, len(layers)]} on the CPU.
    """
    device = input_device(model)
    ids, mask, pos, lengths = pad_batch(target_ids, pad_id, device)
    patch_mask = position_mask(position_lists, ids.shape[1], device)
    n_layers = len(blocks(model))

    def run_hooks(layer):
        if knockout:
            return [(attention_module(model, l), knockout_hook(patch_mask, lengths - 1), "pre")
                    for l in window_layers(layer, window, n_layers)]
        return [(component_module(model, site.component, l), replace_hook(patch_mask, source_values[l]))
                for l in window_layers(layer, window, n_layers)]

    with hooks(noise_hooks(model, target_noise)):
        target = last_logprobs(model, ids, mask, pos, lengths, " in the unpatched target run")
        target_answer = torch.as_tensor(target_answer, device=target.device)
        source_answer = torch.as_tensor(source_answer, device=target.device)
        per_layer = []
        for layer in layers:
            with hooks(run_hooks(layer)):
                patched = last_logprobs(model, ids, mask, pos, lengths,
                                        f" at site {site.label} ({site.component}@{site.positions}), layer {layer}")
            per_layer.append({k: v.cpu() for k, v in patch_metrics(patched, target, target_answer,
                                                                   source_answer, base).items()})
    return {k: torch.stack([m[k] for m in per_layer], dim=1) for k in per_layer[0]}

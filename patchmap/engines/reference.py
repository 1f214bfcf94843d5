"""The reference engine: forward hooks on the model's own modules, one full forward per (site, layer),
batched over examples. Simple and slow; the fast engine is tested against it."""

import torch
from tqdm.auto import tqdm

from ..encoding import token_lists
from ..job import PatchJob, window_layers
from ..metrics import patch_metrics
from ..models import blocks, component_width, input_device
from ..sites import site_positions
from .hooks import hooks, last_logits, noise_hooks, pad_batch, position_mask
from .memory import halve_range, halving_on_out_of_memory
from .samples import compared, compared_targets, copies


def run_reference(job: PatchJob) -> dict:
    """{site key: per-example metrics [example, layer]} for every site of the PatchJob `job`."""
    return {site.key: site_metrics(job, site) for site in job.sites}


@torch.no_grad()
def site_metrics(job: PatchJob, site):
    """One site's metrics: the intervention's strategy applied at the site's positions in the window around
    each layer, batch by batch; a batch that runs out of memory is halved."""
    targets = token_lists(job.pairs, "target_ids")
    pos = site_positions(job.pairs, site)
    hidden = job.model.config.hidden_size
    strategy = job.intervention.strategy

    def run(batch):
        a, b = batch
        width = max(len(t) for t in targets[a:b])
        noise = job.intervention.target_noise(job.pairs, a, b, width, hidden)
        return patch_batch(job.model, site, job.layers, targets[a:b], pos[a:b],
                           strategy.reference_values(job.sources, site, pos, width,
                                                     component_width(job.model, site.component), a, b),
                           job.pairs["target_answer"].values[a:b], job.pairs["source_answer"].values[a:b],
                           job.pad_id, strategy, job.js_base, None if noise is None else noise.to(input_device(job.model)),
                           window=job.window, samples=job.intervention.samples)

    batches = tqdm(job.batches(), desc=f"patch {site.label}", unit="batch", disable=not job.progress)
    results = job.empty_results()
    for (a, b), metrics in halving_on_out_of_memory(
            batches, run, halve_range, lambda batch: f"patching examples {batch[0]}-{batch[1] - 1} at site {site.label}"):
        for k, v in metrics.items():
            results[k][a:b] = v.numpy()
    return job.site_result(site, results)


@torch.no_grad()
def patch_batch(model, site, layers: list, target_ids: list, position_lists: list, source_values, target_answer,
                source_answer, pad_id: int, strategy, base: float = 2.0, target_noise=None, window: int = 1,
                samples: int = 1) -> dict:
    """Metrics for one batch of examples at one site, every layer in `layers`.

    For each layer l the target runs with `strategy` (patchmap.engines.strategies) applied at the site's
    positions in every layer of window_layers(l, window): a Write writes `source_values[layer]` ([B, T,
    H], the source activation at the site's positions) in, a Block blocks the attention edges from the
    last position to the site's positions. `target_noise` [B x samples, T, H], if given, is added to the
    target's input embeddings in every target run, patched or not: each example runs in `samples` copies
    (rows e x samples + k), whose next-token distributions are averaged (patchmap.engines.samples).
    Returns {metric: [B, len(layers)]}, top_token and top_prob [B, len(layers), rank], target_top_token and
    target_top_prob [B, rank], on the CPU.
    """
    device = input_device(model)
    ids, mask, pos, lengths = pad_batch(copies(target_ids, samples), pad_id, device)
    where = position_mask(copies(position_lists, samples), ids.shape[1], device)
    if source_values is not None and samples > 1:
        source_values = {layer: v.repeat_interleave(samples, dim=0) for layer, v in source_values.items()}
    n_layers = len(blocks(model))
    with hooks(noise_hooks(model, target_noise)):
        target = last_logits(model, ids, mask, pos, lengths, " in the unpatched target run")
        targets = compared_targets(target, samples)
        rows = torch.arange(len(targets.logprobs), device=target.device)
        target_answer = torch.as_tensor(target_answer, device=target.device)
        source_answer = torch.as_tensor(source_answer, device=target.device)
        per_layer = []
        for layer in layers:
            edits = strategy.reference_hooks(model, site, window_layers(layer, window, n_layers), where,
                                             source_values, lengths)
            with hooks(edits):
                patched, logits = compared(last_logits(
                    model, ids, mask, pos, lengths,
                    f" at site {site.label} ({site.component}@{site.positions}), layer {layer}"), samples)
            per_layer.append({k: v.cpu() for k, v in patch_metrics(patched, targets, rows, target_answer,
                                                                   source_answer, base, logits=logits).items()})
    target_top = dict(zip(("target_top_token", "target_top_prob"), (x.cpu() for x in targets.top())))
    return {**{k: torch.stack([m[k] for m in per_layer], dim=1) for k in per_layer[0]}, **target_top}

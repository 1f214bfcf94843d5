"""The fast engine's driver: a PatchJob batch by batch (one clean run per batch, shared by every site),
site by site (the runs of each site's schedule through FastEngine's block calls), then one output-embedding
pass over every run of the batch for the logits and metrics."""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ...errors import UserError
from ...job import touched_layers, window_layers
from ...metrics import ROWS, patch_metrics
from ...quantities import METRICS
from ...pairs import token_lists
from ...sites import site_positions
from ..hooks import check_finite
from ..memory import halve_range, halving_on_out_of_memory
from . import schedule
from .blocks import FastEngine

log = logging.getLogger(__name__)

HEAD_ROWS = 4096         # patched runs per output-embedding call, at most
HEAD_ELEMENTS = 1 << 25  # and logits per call (128 MB in float32)


@dataclass
class Batch:
    """Examples a..b of a job, with their clean run: what the runs of every site on them share."""
    a: int
    b: int
    clean: object        # the CleanRun of the batch
    lengths: list        # [B] prompt lengths
    answers: list        # [target answers [B], source answers [B]], on the output device
    use_prefix: bool     # whether keys and values were recorded (prefix caches apply)


@torch.no_grad()
def patch(job, engine=None, **options):
    """{site name: per-example metrics [example, layer]} for every site of the PatchJob `job` (the source
    patched into every layer of window_layers(layer, window)), from one clean run per batch of examples
    shared by every site. `engine` reuses a FastEngine (its stats then count this job too); else one is
    made with `options` (max_tokens, fail_above, spans)."""
    engine = engine or FastEngine(job.model, **options)
    pairs, n = job.pairs, job.n_examples
    targets = token_lists(pairs, "target_ids")
    lengths = [len(t) for t in targets]
    positions = {s.name: site_positions(pairs, s) for s in job.sites}
    results = {s.name: {k: np.zeros((n, len(job.layers)), np.int8 if k == "flip" else np.float32) for k in METRICS}
               for s in job.sites}
    answers = [torch.as_tensor(pairs[f"{r}_answer"].values, device=engine.output_device) for r in ("target", "source")]
    same_until = job.intervention.same_until(pairs, targets, token_lists(pairs, "source_ids"))
    first = min(window_layers(layer, job.window, engine.n_layers)[0] for layer in job.layers)
    available = extracted_layers(job, engine.n_layers)
    bar = tqdm(total=n, desc="patch (fast)", unit="example", disable=not job.progress)

    def clean_run(examples):
        a, b = examples
        noise = job.intervention.target_noise(pairs, a, b, max(lengths[a:b]), job.model.config.hidden_size)
        return engine.clean_run(targets[a:b], job.pad_id, noise)

    for (a, b), clean in halving_on_out_of_memory(
            job.batches(), clean_run, halve_range, lambda ab: f"in the clean run of examples {ab[0]}-{ab[1] - 1}",
            on_retry=lambda ab: engine.shrink_budget(sum(lengths[ab[0]:ab[1]]))):
        use_prefix = len(clean.kv) == engine.n_layers
        if not use_prefix and "prefix" not in engine.warned:
            engine.warned.add("prefix")
            log.warning("fast engine: no keys and values recorded for '%s'; recomputing every position "
                        "(slower, same numbers)", job.model.config.model_type)
        batch = Batch(a, b, clean, lengths[a:b], [x[a:b] for x in answers], use_prefix)
        finals = []
        for number, site in enumerate(job.sites):
            here = positions[site.name][a:b]
            spans = schedule.spans(site, here, batch.lengths, first, available, engine.n_layers,
                                   None if same_until is None else same_until[a:b], use_prefix and engine.spans)
            finals += site_runs(engine, job, batch, number, positions=here, spans=spans, first=first)
            unpatched(batch, here, job.js_base, results[site.name])
        score(engine, job, batch, finals, results)
        bar.update(b - a)
    bar.close()
    return {site.name: job.site_result(site, results[site.name]) for site in job.sites}


def extracted_layers(job, n_layers):
    """The layers job.sources holds source activations at; a patchmap error if a window needs another.
    None of them for an intervention that writes no sources."""
    if not job.intervention.writes_sources:
        return set()
    available = {int(layer) for layer in job.sources["layer"].values}
    missing = sorted(set(touched_layers(job.layers, job.window, n_layers)) - available)
    if missing:
        raise UserError(f"no source activations at layers {missing}, which the patch windows touch; extract "
                        "them at every layer of window_layers(layer, window)")
    return available


def unpatched(batch, positions, base, out):
    """Examples with nothing to patch at a site (e.g. an empty relation) get the target's own metrics."""
    clean, answers, a = batch.clean, batch.answers, batch.a
    for e, ps in enumerate(positions):
        if not ps:
            same = patch_metrics(clean.target[e:e + 1], clean.target[e:e + 1], answers[0][e:e + 1],
                                 answers[1][e:e + 1], base)
            for k, v in same.items():
                out[k][a + e, :] = v.cpu().numpy()[0]


class Sources:
    """The source activations of one site for the examples a..b of a clean batch, by model layer."""

    def __init__(self, acts, site, a, b, engine):
        self.values = torch.from_numpy(np.ascontiguousarray(acts[f"act_{site.name}"].values[a:b])).to(
            engine.device, engine.dtype)                                     # [B, layer, slot, H]
        self.index = {int(layer): i for i, layer in enumerate(acts["layer"].values)}

    def __call__(self, rows, slots, layer):
        """[len(rows), H]: clean-batch row rows[i], slot slots[i], at model layer `layer`."""
        return self.values[rows, self.index[layer], slots]

    def span(self, rows, width, layer):
        """[len(rows), width, H]: the first `width` slots of each row at model layer `layer`."""
        return self.values[rows, self.index[layer], :width]


def site_runs(engine, job, batch, site_number, positions, spans, first):
    """The last-position hidden states of every (example, layer) run of site `site_number` on one clean
    batch: a list of (site number, clean-batch rows, layer ids, hidden [R, H]). `positions`: the site's in
    each example; `spans`: the span path's (schedule.spans); `first`: the first layer any window patches.
    An intervention that writes no sources (knockout) blocks the last position's attention to the site's
    positions instead."""
    site, clean, lengths = job.sites[site_number], batch.clean, batch.lengths
    sources = Sources(job.sources, site, batch.a, batch.b, engine) if job.intervention.writes_sources else None
    site_mask = None
    if sources is None:
        site_mask = torch.zeros(len(positions), int(max(lengths)), dtype=torch.bool)
        for e, ps in enumerate(positions):
            site_mask[e, ps] = True
        site_mask = site_mask.to(engine.device)
    kv = clean.kv.get
    if spans is not None and any(s is not None for s in spans):
        span_kv = engine.span_kv(clean, {e: (positions[e][0], s) for e, s in enumerate(spans) if s is not None},
                                 sources, first + 1)
        kv = span_kv.get
    chunks = schedule.groups(positions, lengths, batch.use_prefix, spans, list(range(len(job.layers))), engine.max_tokens,
                             engine.device, site_mask is not None)

    def run(chunk):
        group, lis = chunk
        return engine.run_group(clean, site.component, group, lis, job.layers, sources, kv, job.window, site_mask)

    def runs_in(chunk):
        group, lis = chunk
        return len(group.examples) * len(lis) * group.width

    finals = []
    for (group, _), (hidden, order) in halving_on_out_of_memory(
            chunks, run, lambda chunk: schedule.split(chunk, positions, engine.device),
            lambda chunk: f"patching {len(chunk[0].examples) * len(chunk[1])} runs at site {site.label}",
            on_retry=lambda chunk: engine.shrink_budget(runs_in(chunk))):
        rows = group.examples.repeat(len(order))
        layer_ids = torch.as_tensor(order, device=engine.device).repeat_interleave(len(group.examples))
        finals.append((site_number, rows, layer_ids, hidden))
    return finals


def score(engine, job, batch, finals, results):
    """Logits, their non-finite check and the metrics of every patched run of a clean batch, in chunks of
    rows (one output-embedding call for many sites and layers)."""
    if not finals:
        return
    clean, answers, a = batch.clean, batch.answers, batch.a
    site_of = torch.cat([torch.full((len(f[1]),), f[0], dtype=torch.long) for f in finals])
    rows = torch.cat([f[1] for f in finals])
    layer_ids = torch.cat([f[2] for f in finals])
    hidden = torch.cat([f[3] for f in finals])
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    step = max(1, min(HEAD_ROWS, HEAD_ELEMENTS // vocab))
    for c in range(0, len(rows), step):
        part = slice(c, c + step)
        patched = engine.head(hidden[part])
        engine.stats["head_rows"] += patched.shape[0]

        def where(bad, c=c):
            site = job.sites[int(site_of[c + bad])]
            return f" at site {site.label} ({site.component}@{site.positions}), layer {job.layers[int(layer_ids[c + bad])]}"
        check_finite(patched, where)
        for r in range(0, len(patched), ROWS):  # in place, in cache-sized pieces
            patched[r:r + ROWS] = torch.log_softmax(patched[r:r + ROWS], dim=-1)
        r = rows[part]
        here = r.to(patched.device)
        metrics = {k: v.cpu().numpy() for k, v in
                   patch_metrics(patched, clean.target[here], answers[0][here], answers[1][here], job.js_base).items()}
        sites_here = site_of[part].numpy()
        ex_index, li_index = a + r.cpu().numpy(), layer_ids[part].cpu().numpy()
        for number in np.unique(sites_here):
            mine = sites_here == number
            for k, v in metrics.items():
                results[job.sites[number].name][k][ex_index[mine], li_index[mine]] = v[mine]

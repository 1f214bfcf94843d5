"""The fast engine's driver: a PatchJob batch by batch (one clean run per batch, shared by every site),
site by site (the runs of each site's schedule through the block calls), then one output-embedding pass
over every run of the batch for the logits and metrics. With noise samples (patchmap.engines.samples) a
batch's rows are the copies of its examples, and the metrics are those of the copies' mean distribution."""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ...encoding import token_lists
from ...errors import UserError
from ...job import PatchJob, touched_layers, window_layers
from ...metrics import Targets, equal_slices, patch_metrics
from ...sites import site_positions
from ..hooks import report_non_finite
from ..memory import halve_range, halving_on_out_of_memory
from ..samples import compared, compared_targets, copies, side_by_side
from . import runs, schedule
from .blocks import FastEngine
from .clean import CleanRun, target_logits

log = logging.getLogger(__name__)

HEAD_ROWS = 4096         # patched runs per output-embedding call, at most
HEAD_ELEMENTS = 1 << 26  # and logits per call (256 MB in float32)


@dataclass
class Batch:
    """Examples a..b of a job, with their clean run: what the runs of every site on them share. The clean
    run's rows are the examples' `samples` copies each (rows e x samples + k)."""
    a: int
    b: int
    clean: CleanRun
    lengths: list        # [B x samples] prompt lengths, per clean-run row
    answers: list        # [target answers [B], source answers [B]], on the output device
    use_prefix: bool     # whether keys and values were recorded (prefix caches apply)
    samples: int         # copies of each example
    targets: Targets = None  # the unpatched targets' next-token distributions (of their copies' mean), [B, V],
                             # set by score(), with the patched runs'
    own: dict = None         # {metric: [B]}, the targets compared with themselves (own_metrics)


@dataclass
class PatchedRuns:
    """The last-position hidden states of some runs of one site (or the heads of a head site) on a clean batch."""
    site_numbers: torch.Tensor  # [R] index into the job's sites of each run (CPU)
    rows: torch.Tensor    # [R] clean-batch row (example) of each run
    layer_ids: torch.Tensor  # [R] index into the job's layers of each run
    hidden: torch.Tensor  # [R, H]
    unchanged: torch.Tensor  # [R] bool (CPU): the run's output is the clean one (runs.unchanged)


@torch.no_grad()
def run_fast(job: PatchJob, engine: FastEngine = None, **options) -> dict:
    """{site key (Site.key): per-example metrics [example, layer]} for every site of the PatchJob `job` (each
    run edits every layer of window_layers(layer, window), as the intervention's strategy says), from one
    clean run per batch of examples shared by every site. `engine` reuses a FastEngine (its stats then count this
    job too); else one is made with `options` (max_tokens, fail_above, spans)."""
    # 1. what every batch needs: prompts, the sites' positions, answers, where runs may share the source's prefix
    engine = engine or FastEngine(job.model, **options)
    pairs, n = job.pairs, job.n_examples
    targets = token_lists(pairs, "target_ids")
    lengths = [len(t) for t in targets]
    positions = {s.key: site_positions(pairs, s) for s in job.sites}
    results = {s.key: job.empty_results() for s in job.sites}
    answers = [torch.as_tensor(pairs[f"{r}_answer"].values, device=engine.output_device) for r in ("target", "source")]
    same_until = job.intervention.same_until(pairs, targets, token_lists(pairs, "source_ids"))
    first = min(window_layers(layer, job.window, engine.n_layers)[0] for layer in job.layers)
    available = extracted_layers(job, engine.n_layers)
    samples = job.intervention.samples  # noised copies of each example in the clean runs
    bar = tqdm(total=n, desc="patch (fast)", unit="example", disable=not job.progress)

    def clean_run(examples):
        a, b = examples
        noise = job.intervention.target_noise(pairs, a, b, max(lengths[a:b]), job.model.config.hidden_size)
        return engine.clean_run(copies(targets[a:b], samples), job.pad_id, noise)

    # 2. batch by batch: the clean run of every copy (halved if it runs out of memory) ...
    for (a, b), clean in halving_on_out_of_memory(
            job.batches(), clean_run, halve_range, lambda ab: f"in the clean run of examples {ab[0]}-{ab[1] - 1}",
            on_retry=lambda ab: engine.shrink_budget(samples * sum(lengths[ab[0]:ab[1]]))):
        use_prefix = len(clean.keys_values) == engine.n_layers
        if not use_prefix and "prefix" not in engine.warned:
            engine.warned.add("prefix")
            log.warning("fast engine: no keys and values recorded for '%s'; recomputing every position "
                        "(slower, same numbers)", job.model.config.model_type)
        batch = Batch(a, b, clean, copies(lengths[a:b], samples), [x[a:b] for x in answers], use_prefix, samples)
        # 3. ... the patched runs of every site (positions per clean-run row), a head site's heads together ...
        patched = []
        for numbers in sharing_calls(job):
            site = job.sites[numbers[0]]
            rows = copies(positions[site.key][a:b], samples)
            spans = schedule.spans(site, rows, batch.lengths, first, available, engine.n_layers,
                                   None if same_until is None else copies(same_until[a:b], samples),
                                   use_prefix and engine.spans)
            patched += site_runs(engine, job, batch, numbers, positions=rows, spans=spans, first=first)
        # 4. ... and the logits and metrics of all of them and of the unpatched targets
        score(engine, job, batch, patched, results)
        target_top = [x.cpu().numpy() for x in batch.targets.top()]
        for site in job.sites:
            unpatched(batch, positions[site.key][a:b], job.js_base, results[site.key])
            results[site.key]["target_top_token"][a:b], results[site.key]["target_top_prob"][a:b] = target_top
        bar.update(b - a)
    bar.close()
    return {site.key: job.site_result(site, results[site.key]) for site in job.sites}


def sharing_calls(job: PatchJob) -> list:
    """The job's site numbers in lists whose runs share block calls: the one-head sites of a head site
    (patchmap.sites.one_per_head) together, where the intervention's strategy can write per head
    (shares_heads), every other site alone."""
    if not job.intervention.strategy.shares_heads:
        return [[number] for number in range(len(job.sites))]
    out, heads_of = [], {}
    for number, site in enumerate(job.sites):
        if site.head is None:
            out.append([number])
        elif site.name in heads_of:
            heads_of[site.name].append(number)
        else:
            heads_of[site.name] = [number]
            out.append(heads_of[site.name])
    return out


def extracted_layers(job: PatchJob, n_layers: int) -> set:
    """The layers job.sources holds source activations at; a patchmap error if a window needs another.
    None of them for an intervention that writes no sources."""
    if job.sources is None:
        return set()
    available = {int(layer) for layer in job.sources["layer"].values}
    missing = sorted(set(touched_layers(job.layers, job.window, n_layers)) - available)
    if missing:
        raise UserError(f"no source activations at layers {missing}, which the patch windows touch; extract "
                        "them at every layer of window_layers(layer, window)")
    return available


def own_metrics(batch: Batch, base: float) -> dict:
    """{metric: [B]} of each unpatched target compared with itself: what a run that changes nothing gets
    (made once per batch, when one needs it)."""
    if batch.own is None:
        targets = batch.targets
        rows = torch.arange(len(targets.logprobs), device=targets.logprobs.device)
        batch.own = {k: v.cpu().numpy() for k, v in patch_metrics(
            targets.logprobs.clone(), targets, rows, batch.answers[0], batch.answers[1], base).items()}
    return batch.own


def unpatched(batch: Batch, positions: list, base: float, out: dict) -> None:
    """Examples with nothing to patch at a site (e.g. an empty relation) get the target's own metrics."""
    for e, ps in enumerate(positions):
        if not ps:
            for k, v in own_metrics(batch, base).items():
                out[k][batch.a + e, :] = v[e]


def site_runs(engine: FastEngine, job: PatchJob, batch: Batch, numbers: list, positions: list, spans: list,
              first: int) -> list:
    """The PatchedRuns of every (example, layer) run of the sites `numbers` on one clean batch: one site, or
    the one-head sites of a head site, whose runs then share the block calls (a row per head). `positions`:
    the site's in each example; `spans`: the span path's (schedule.spans); `first`: the first layer any
    window patches."""
    site, clean, lengths = job.sites[numbers[0]], batch.clean, batch.lengths
    heads = [job.sites[number].head for number in numbers] if len(numbers) > 1 else []
    edit = job.intervention.strategy.fast_runs(engine, job.sources, site, batch, positions, heads)
    keys_values_of = clean.keys_values.get
    if spans is not None and any(s is not None for s in spans):
        span_keys_values = engine.span_keys_values(
            clean, {e: (positions[e][0], s) for e, s in enumerate(spans) if s is not None}, edit.sources, first + 1)
        keys_values_of = span_keys_values.get
    chunks = schedule.groups(positions, lengths, batch.use_prefix, spans, list(range(len(job.layers))),
                             engine.max_tokens, engine.device, edit, heads)

    def run(chunk):
        group, layer_ids = chunk
        return runs.run_group(engine, clean, group, layer_ids, job.layers, edit, keys_values_of, job.window)

    def tokens_in(chunk):
        group, layer_ids = chunk
        return len(group.examples) * len(layer_ids) * group.width

    out = []
    for (group, _), (hidden, order, unchanged) in halving_on_out_of_memory(
            chunks, run, lambda chunk: schedule.split(chunk, positions, engine.device),
            lambda chunk: f"patching {len(chunk[0].examples) * len(chunk[1])} runs at site {site.label}",
            on_retry=lambda chunk: engine.shrink_budget(tokens_in(chunk))):
        rows = group.examples.repeat(len(order))
        layer_ids = torch.as_tensor(order, device=engine.device).repeat_interleave(len(group.examples))
        if group.heads is None:
            site_numbers = torch.full((len(rows),), numbers[0], dtype=torch.long)
        else:  # each row's head's site
            number_of_head = torch.zeros(max(heads) + 1, dtype=torch.long)
            number_of_head[heads] = torch.as_tensor(numbers)
            site_numbers = number_of_head[group.heads.cpu().repeat(len(order))]
        out.append(PatchedRuns(site_numbers, rows, layer_ids, hidden, unchanged))
    return out


def score(engine: FastEngine, job: PatchJob, batch: Batch, patched: list, results: dict) -> None:
    """Logits and metrics of every PatchedRuns of a clean batch, into `results` {site: {metric: [example,
    layer]}}: the output embedding on chunks of many runs at once (sites and layers together), each chunk's
    logits turned into log-probs and compared with their targets piece by piece while in cache; with noise
    samples, the metrics of each run's copies' mean distribution. The unpatched targets' rows lead the first
    chunk (one product for theirs and the runs', not a small one of their own), and become batch.targets;
    runs whose output is the clean one get their target's own metrics (own_metrics)."""
    answers, a, samples = batch.answers, batch.a, batch.samples
    leading = batch.clean.last_hidden  # [B x samples, H]
    rows, hidden = torch.zeros(0, dtype=torch.long, device=engine.device), leading[:0]
    same = None  # (site numbers, examples, layer ids) of the runs whose output is the clean one
    if patched:
        site_of = torch.cat([p.site_numbers for p in patched])
        rows = torch.cat([p.rows for p in patched])
        layer_ids = torch.cat([p.layer_ids for p in patched])
        hidden = torch.cat([p.hidden for p in patched])
        unchanged = torch.cat([p.unchanged for p in patched])
        if unchanged.any():
            first_copy = unchanged & (rows.cpu() % samples == 0)
            same = [x.cpu()[first_copy].numpy() for x in (site_of, rows // samples, layer_ids)]
            kept = ~unchanged
            site_of, rows, layer_ids, hidden = (x[kept.to(x.device)] for x in (site_of, rows, layer_ids, hidden))
    if len(rows):
        site_of, rows, layer_ids, hidden = side_by_side(samples, site_of, rows, layer_ids, hidden)
        by_example = torch.argsort(rows // samples, stable=True)  # one example's runs share its target's row
        site_of, rows, layer_ids = site_of[by_example.cpu()], rows[by_example], layer_ids[by_example]
        hidden = hidden[by_example.to(hidden.device)]
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    n_runs, most = len(rows) // samples, max(1, min(HEAD_ROWS, HEAD_ELEMENTS // vocab) // samples)
    targets = None
    for chunk in equal_slices(0, n_runs, most) or [slice(0, 0)]:  # with no runs, the targets' rows alone
        c = chunk.start * samples
        chunk_rows, first_copies = slice(c, chunk.stop * samples), slice(c, chunk.stop * samples, samples)
        if targets is None:  # [B x samples + chunk, V] float32, the targets' rows first
            logits = engine.head(torch.cat([leading.to(hidden.device), hidden[chunk_rows]]))
            engine.stats["target_head_rows"] += len(leading)
            # (compared_targets copies them: the head writes into a buffer it reuses)
            targets = batch.targets = compared_targets(target_logits(engine, batch.clean, logits[:len(leading)]),
                                                       samples)
            logits = logits[len(leading):]
        else:
            logits = engine.head(hidden[chunk_rows])  # [chunk, V] float32
        engine.stats["head_rows"] += logits.shape[0]
        engine.stats["head_calls"] += 1
        if not len(logits):
            break
        compared_runs, is_logits = compared(logits, samples)  # a row per run
        here = rows[first_copies].to(logits.device) // samples
        metrics = {k: v.cpu().numpy() for k, v in patch_metrics(
            compared_runs, targets, here, answers[0][here], answers[1][here], job.js_base, logits=is_logits).items()}

        def where(bad, c=c):
            run = c + bad * samples
            site = job.sites[int(site_of[run])]
            return f" at site {site.label} ({site.component}@{site.positions}), layer {job.layers[int(layer_ids[run])]}"
        report_non_finite(metrics, where)
        store(results, job, site_of[first_copies].numpy(), a + here.cpu().numpy(),
              layer_ids[first_copies].cpu().numpy(), metrics)
    if same is not None:
        sites_same, examples, li_same = same
        own = {k: v[examples] for k, v in own_metrics(batch, job.js_base).items()}
        store(results, job, sites_same, a + examples, li_same, own)


def store(results: dict, job: PatchJob, site_numbers, examples, layer_ids, metrics: dict) -> None:
    """Runs' metrics {metric: [R]} into `results` {site: {metric: [example, layer]}}, run i at site
    job.sites[site_numbers[i]], example examples[i] and layer index layer_ids[i] (arrays [R])."""
    for number in np.unique(site_numbers):
        mine = site_numbers == number
        for k, v in metrics.items():
            results[job.sites[number].key][k][examples[mine], layer_ids[mine]] = v[mine]

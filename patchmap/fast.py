"""The fast patching engine: many patched runs per forward, and nothing recomputed that a patch cannot change.

For a batch of examples, the unpatched target runs once through the model's own forward. Hooks record
each decoder block's input hidden state and call arguments (masks, rotary embeddings, position ids), and
a recording cache records each layer's keys and values. The patched runs then never go through the
model's forward; they go through its decoder blocks, called directly, on a schedule over layers:

- a run patched at layer l joins the batch at block l (attn, mlp: with the clean block input, and a hook
  on the component writes the source activation into that run's rows) or at block l + 1 (resid: the
  block's clean output with the source activation written in), so blocks before a run's layer are
  never recomputed for it, and every run active at a block shares one call of that block;
- only positions from the first patched position on (the suffix) are computed: earlier positions are
  identical to the clean run, so their keys and values come from the recording as a prefix cache;
- logits are computed only at each prompt's last position (final norm and output embedding applied
  to that position's hidden state; Gemma's final softcapping included).

Examples are grouped by their first patched position and their length, so a site at the last token
computes one position per run and no run computes padding. Runs are chunked to a budget of (runs x suffix positions) per block call; an out-of-memory error
(CUDA or CPU) halves the chunk and retries it, with a warning in the log, so no result is lost or changed.
The reference engine (patchmap.engine, hooks on a full forward per layer) stays the ground truth that
tests/test_fast_engine.py compares this engine with.
"""

import inspect
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from . import models
from .engine import _output_tensor, _with_tensor, hooks, pad_batch
from .errors import UserError
from .metrics import METRICS, patch_metrics

log = logging.getLogger(__name__)

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
DEFAULT_CPU_TOKENS = 16384


def is_out_of_memory(error):
    """True for CUDA and CPU allocation failures (torch.OutOfMemoryError or the allocators' messages)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message
                                                or "DefaultCPUAllocator: can't allocate" in message)


class _RecordingCache(DynamicCache):
    """Given to the clean run: records each layer's keys and values as the attention hands them to the
    cache (after rotary embeddings), stores nothing, so the run behaves exactly like a first forward."""

    def __init__(self, config):
        super().__init__(config=config)
        self.recorded = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.recorded[layer_idx] = (key_states, value_states)
        return key_states, value_states


class _PrefixCache(DynamicCache):
    """Given to one block call of patched runs: the clean keys and values of the positions before the
    suffix, one row per run, put in front of the suffix's own keys and values."""

    def __init__(self, keys, values):
        super().__init__()
        self.prefix = (keys, values)

    recorded = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.recorded = (key_states, value_states)
        keys, values = self.prefix
        if keys.shape[2] == 0:
            return key_states, value_states
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)


def _positional_names(module):
    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _rows(tensor, rows):
    """Rows `rows` of a tensor whose first dimension is the batch (or 1, shared by every row)."""
    if tensor.shape[0] == 1:
        return tensor.expand(len(rows), *tensor.shape[1:])
    return tensor[rows]


@dataclass
class CleanRun:
    """The unpatched target run of one batch of examples."""
    lengths: torch.Tensor        # [B]
    inputs: list                 # block l's input hidden state, [B, T, H]
    last_output: torch.Tensor    # the last block's output, [B, T, H]
    arguments: list              # block l's call arguments other than the hidden state
    hidden_name: list            # the name of block l's hidden-state argument
    kv: dict                     # layer -> (keys, values) [B, kv_heads, T, head_dim]
    target: torch.Tensor         # [B, V] float32 log-probs at the last position

    def block_output(self, layer):
        return self.inputs[layer + 1] if layer + 1 < len(self.inputs) else self.last_output


class FastEngine:
    """Patched runs of many (example, layer) combinations per block call; see the module docstring.

    `max_tokens` bounds runs x suffix positions per block call (default: from free GPU memory, or 16,384
    on the CPU). `fail_above` makes any forward over that many tokens raise an out-of-memory error, to
    test the back-off. `spans=False` turns off the source-prefix path for resid spans (_spans).
    """

    def __init__(self, model, max_tokens=None, fail_above=None, spans=True):
        self.model = model
        self.config = model.config
        models.check_supported(self.config.model_type)
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"the fast engine supports the attention implementations "
                            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}, not '{impl}'; load the model with one "
                            "of them or use engine: reference")
        self.blocks = models.blocks(model)
        self.finals = models.final_modules(model)
        self.n_layers = len(self.blocks)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_tokens = max_tokens or self._default_tokens()
        self.fail_above = fail_above
        self.spans = spans
        self.stats = Counter()
        self._names = [_positional_names(b) for b in self.blocks]
        self._warned = set()

    def _default_tokens(self):
        if self.device.type != "cuda":
            return DEFAULT_CPU_TOKENS
        free, _ = torch.cuda.mem_get_info(self.device)
        hidden = self.config.hidden_size
        inner = getattr(self.config, "intermediate_size", None) or getattr(self.config, "ffn_dim", None) \
            or 4 * hidden
        per_token = torch.finfo(self.dtype).bits // 8 * (10 * hidden + 4 * inner)
        return max(1024, int(free * 0.4 / per_token))

    def _inject(self, tokens):
        if self.fail_above is not None and tokens > self.fail_above:
            raise torch.OutOfMemoryError(f"out of memory (injected: {tokens} tokens > {self.fail_above})")

    # -- the clean run ---------------------------------------------------------------------------------

    @torch.no_grad()
    def clean_run(self, sequences, pad_id):
        ids, mask, positions, lengths = pad_batch(sequences, pad_id, self.device)
        self._inject(ids.numel())
        arguments = [None] * self.n_layers
        inputs = [None] * self.n_layers
        last = {}

        def pre_hook(layer):
            def hook(module, args, kwargs):
                call = dict(zip(self._names[layer], args))
                call.update(kwargs)
                name = self._names[layer][0]
                inputs[layer] = call.pop(name)
                arguments[layer] = (name, call)
            return hook

        def post_hook(module, args, output):
            last["output"] = _output_tensor(output)

        handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        handles.append(self.blocks[-1].register_forward_hook(post_hook))
        cache = _RecordingCache(self.config)
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                use_cache=True).logits
        finally:
            for h in handles:
                h.remove()
        self.stats["clean_tokens"] += ids.numel()
        rows = torch.arange(len(lengths), device=self.device)
        last_logits = logits[rows, lengths - 1].float()
        if not torch.isfinite(last_logits).all():
            raise UserError("non-finite logits (NaN or inf) in the unpatched target run; "
                            "try dtype float32 or bfloat16")
        mine = self.head(last["output"][rows, lengths - 1])
        tolerance = (1e-4 if self.dtype == torch.float32 else 5e-2) * (1 + float(last_logits.abs().max()))
        difference = float((mine - last_logits).abs().max())
        if difference > tolerance:
            raise UserError(f"the fast engine does not reproduce the logits of architecture "
                            f"'{self.config.model_type}' (max difference {difference:.3g}); "
                            "use engine: reference")
        return CleanRun(lengths, inputs, last["output"], [a[1] for a in arguments], [a[0] for a in arguments],
                        cache.recorded, torch.log_softmax(last_logits, dim=-1))

    def head(self, hidden):
        """float32 logits from last-position hidden states [R, H] (the last block's output)."""
        for module in self.finals:
            hidden = module(hidden)
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    # -- patched runs ----------------------------------------------------------------------------------

    def _mask(self, clean_mask, rows, start, end):
        if clean_mask is None:  # the model judged plain causal attention enough
            q = torch.arange(start, end, device=self.device)[:, None]
            k = torch.arange(end, device=self.device)[None, :]
            mask = torch.zeros(1, 1, end - start, end, dtype=self.dtype, device=self.device)
            return mask.masked_fill(k > q, torch.finfo(self.dtype).min)
        if not torch.is_tensor(clean_mask) or clean_mask.dim() != 4:
            raise UserError(f"the fast engine needs a 4D attention mask for '{self.config.model_type}'; "
                            "use engine: reference")
        return _rows(clean_mask[:, :, start:end, :end], rows)

    def _block_arguments(self, clean, layer, rows, start, end, prefix=None):
        out = {}
        for name, value in clean.arguments[layer].items():
            if name in CACHE_ARGUMENTS and value is not None:
                keys, values = clean.kv[layer]
                out[name] = _PrefixCache(*(prefix or (keys[rows, :, :start], values[rows, :, :start])))
            elif name == "attention_mask":
                out[name] = self._mask(value, rows, start, end)
            elif name == "position_embeddings" and isinstance(value, (tuple, list)):
                out[name] = tuple(_rows(t[:, start:end], rows) for t in value)
            elif name == "position_ids" and value is not None:
                out[name] = _rows(value[:, start:end], rows)
            elif torch.is_tensor(value) or isinstance(value, (dict, tuple, list)):
                raise UserError(f"the fast engine does not know the block argument '{name}' of "
                                f"'{self.config.model_type}'; use engine: reference")
            else:
                out[name] = value
        return out

    def _call_block(self, clean, layer, hidden, rows, start, end, patch=None, prefix=None, record=False):
        """Apply block `layer` to hidden [N, S, H] of runs on examples `rows` at positions [start, end);
        `patch` = (module, rows, positions, values) writes the source activation into a component's
        output; `prefix` = (keys, values) of positions [0, start) replaces the clean ones; with `record`,
        also return the keys and values the block computed."""
        kwargs = self._block_arguments(clean, layer, rows, start, end, prefix)
        kwargs[clean.hidden_name[layer]] = hidden
        if record:
            cache = next(v for k, v in kwargs.items() if k in CACHE_ARGUMENTS and v is not None)
            return _output_tensor(self.blocks[layer](**kwargs)), cache.recorded
        self._inject(hidden.shape[0] * hidden.shape[1])
        self.stats["block_tokens"] += hidden.shape[0] * hidden.shape[1]
        self.stats["attention_scores"] += hidden.shape[0] * hidden.shape[1] * end
        self.stats["block_calls"] += 1
        if patch is None:
            return _output_tensor(self.blocks[layer](**kwargs))
        module, prow, ppos, pval = patch

        def hook(mod, args, output):
            h = _output_tensor(output)
            shaped = h.reshape(hidden.shape[0], hidden.shape[1], h.shape[-1])
            shaped = shaped.index_put((prow, ppos), pval.to(h.dtype))
            return _with_tensor(output, shaped.reshape(h.shape))

        with hooks([(module, hook)]):
            return _output_tensor(self.blocks[layer](**kwargs))

    @torch.no_grad()
    def span_prefix(self, clean, examples, layers, values, start, stop, first_block):
        """Keys and values at positions [start, stop) for blocks first_block.. of the *source* runs, when
        the resid site is the whole span [start, stop) and the tokens before it are the target's: a run
        patched there at layer l then equals the source at positions < stop in every block after l."""
        ex = torch.as_tensor(examples, device=self.device)
        index = {layer: li for li, layer in enumerate(layers)}
        kv = {}
        for block in range(first_block, self.n_layers):
            hidden = values[ex, index[block - 1], :stop - start].to(self.dtype)
            _, kv[block] = self._call_block(clean, block, hidden, ex, start, stop, record=True)
        return kv

    @torch.no_grad()
    def run_group(self, clean, component, examples, layer_ids, layers, positions, values, start, end, span=None):
        """Last-position log-probs [len(layer_ids) * len(examples), V] of the runs (example, layer) for
        examples (indices into the clean batch) whose patched positions all lie in [start, end);
        rows are ordered layer-major as in `layer_ids`. With `span` = stop (resid sites covering exactly
        [start, stop) after a prefix equal to the source's), positions before `stop` come from the
        source's keys and values (span_prefix) and only [stop, end) is computed."""
        if span is not None:
            return self._run_span(clean, examples, layer_ids, layers, values, start, span, end)
        ex = torch.as_tensor(examples, device=self.device)
        # where each example's source activation goes: (example row, position - start, slot)
        r_idx, p_idx, s_idx = [], [], []
        for r, e in enumerate(examples):
            for slot, p in enumerate(positions[e]):
                r_idx.append(r)
                p_idx.append(p - start)
                s_idx.append(slot)
        r_idx, p_idx, s_idx = (torch.as_tensor(x, device=self.device) for x in (r_idx, p_idx, s_idx))

        def source(li):
            return values[ex[r_idx], li, s_idx]

        joins = defaultdict(list)  # block index -> layer ids joining there
        for li in layer_ids:
            joins[layers[li] + 1 if component == "resid" else layers[li]].append(li)
        hidden, row_ex, order = None, [], []
        for block in range(min(joins), self.n_layers + 1):
            patch = None
            for li in joins.get(block, []):
                n_before = 0 if hidden is None else hidden.shape[0]
                if component == "resid":
                    joining = clean.block_output(layers[li])[ex, start:end]
                    joining = joining.index_put((r_idx, p_idx), source(li).to(joining.dtype))
                else:
                    joining = clean.inputs[block][ex, start:end]
                    patch = (models.component_module(self.model, component, block), r_idx + n_before, p_idx,
                             source(li))
                hidden = joining if hidden is None else torch.cat([hidden, joining])
                row_ex.append(ex)
                order.append(li)
            if block == self.n_layers:
                break
            rows = torch.cat(row_ex)
            hidden = self._call_block(clean, block, hidden, rows, start, end, patch)
        rows = torch.cat(row_ex)
        last = clean.lengths[rows] - 1 - start
        final = hidden[torch.arange(len(rows), device=self.device), last]
        self.stats["head_rows"] += len(rows)
        self.stats["patched_runs"] += len(rows)
        return torch.log_softmax(self.head(final), dim=-1), order

    def _run_span(self, clean, examples, layer_ids, layers, values, start, stop, end):
        ex = torch.as_tensor(examples, device=self.device)
        local = torch.arange(len(examples), device=self.device)
        first = min(layers[li] for li in layer_ids) + 1
        kv = self.span_prefix(clean, examples, layers, values, start, stop, first)
        joins = defaultdict(list)
        for li in layer_ids:
            joins[layers[li] + 1].append(li)
        hidden, row_ex, row_local, order = None, [], [], []
        for block in range(first, self.n_layers + 1):
            for li in joins.get(block, []):
                joining = clean.block_output(layers[li])[ex, stop:end]
                hidden = joining if hidden is None else torch.cat([hidden, joining])
                row_ex.append(ex)
                row_local.append(local)
                order.append(li)
            if block == self.n_layers:
                break
            rows, rl = torch.cat(row_ex), torch.cat(row_local)
            keys, vals = clean.kv[block]
            prefix = (torch.cat([keys[rows, :, :start], kv[block][0][rl]], dim=2),
                      torch.cat([vals[rows, :, :start], kv[block][1][rl]], dim=2))
            hidden = self._call_block(clean, block, hidden, rows, stop, end, prefix=prefix)
        rows = torch.cat(row_ex)
        last = clean.lengths[rows] - 1 - stop
        final = hidden[torch.arange(len(rows), device=self.device), last]
        self.stats["span_runs"] += len(rows)
        self.stats["head_rows"] += len(rows)
        self.stats["patched_runs"] += len(rows)
        return torch.log_softmax(self.head(final), dim=-1), order

    def chunks(self, n_examples, layer_ids, width):
        """Split (examples, layers) so that runs x suffix width stays within the token budget."""
        runs = max(1, self.max_tokens // max(width, 1))
        if runs >= len(layer_ids):
            step = runs // len(layer_ids)
            return [(list(range(a, min(a + step, n_examples))), list(layer_ids))
                    for a in range(0, n_examples, step)]
        return [([e], list(layer_ids[a:a + runs])) for e in range(n_examples)
                for a in range(0, len(layer_ids), runs)]

    def with_backoff(self, work, size, what):
        """Run `work()`; on out-of-memory, halve the token budget, log it, and let the caller split."""
        try:
            return work()
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            message = str(error).splitlines()[0][:200]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.max_tokens = max(1, min(self.max_tokens, size) // 2)
        self.stats["oom_retries"] += 1
        log.warning("out of memory in %s (%s); retrying in smaller chunks (token budget now %d)",
                    what, message, self.max_tokens)
        return None


def _site_groups(positions, lengths, use_prefix, spans=None):
    """Examples grouped by their first patched position (0 for all when no prefix cache is used), by
    the end of their span where `spans[e]` says the span path applies (else None), and by length, so
    that no group computes padding."""
    groups = defaultdict(list)
    for e, ps in enumerate(positions):
        if ps:
            span = spans[e] if spans is not None else None
            groups[(min(ps) if use_prefix else 0, span if span is not None else -1, int(lengths[e]))].append(e)
    return [(start, None if span < 0 else span, members, end)
            for (start, span, end), members in sorted(groups.items())]


def _spans(site, positions, lengths, layers, n_layers, target_ids, source_ids, use_prefix):
    """For each example, the end of its patched span if the span path applies: a resid site whose
    positions are one run [start, stop) before the last token, after tokens equal in target and source,
    with the source activation of every layer from the first patched one on (it is the input of the
    blocks after it). Else None."""
    if site.component != "resid" or not use_prefix or not set(range(min(layers), n_layers - 1)) <= set(layers):
        return None
    out = []
    for ps, n, t, s in zip(positions, lengths, target_ids, source_ids):
        ok = ps and ps == list(range(ps[0], ps[-1] + 1)) and ps[-1] + 1 < n and t[:ps[0]] == s[:ps[0]]
        out.append(ps[-1] + 1 if ok else None)
    return out


@torch.no_grad()
def patch_sites(model, pairs, acts, sites, layers, batch_size, pad_id, base=2.0, progress=True,
                max_tokens=None, fail_above=None, engine_object=None):
    """Per-example metrics [example, layer] for each site, as patching.patch_site returns them, from one
    clean run per batch of examples shared by every site. `engine_object` reuses a FastEngine (its
    stats then count this call too)."""
    import xarray as xr

    from .pairs import token_lists
    from .patching import site_positions

    engine = engine_object or FastEngine(model, max_tokens=max_tokens, fail_above=fail_above)
    targets = token_lists(pairs, "target_ids")
    sources = token_lists(pairs, "source_ids")
    n = len(targets)
    positions = {s.name: site_positions(pairs, s) for s in sites}
    results = {s.name: {k: np.zeros((n, len(layers)), np.int8 if k == "flip" else np.float32) for k in METRICS}
               for s in sites}
    target_answer = torch.as_tensor(pairs["target_answer"].values, device=engine.device)
    source_answer = torch.as_tensor(pairs["source_answer"].values, device=engine.device)
    lengths = [len(t) for t in targets]
    pending = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
    bar = tqdm(total=n, desc="patch (fast)", unit="example", disable=not progress)
    while pending:
        a, b = pending.pop(0)
        clean = engine.with_backoff(lambda: engine.clean_run(targets[a:b], pad_id),
                                    sum(lengths[a:b]), f"the clean run of examples {a}-{b - 1}")
        if clean is None:
            if b - a == 1:
                raise UserError(f"out of memory in the clean run of one example ({a}); use a smaller model "
                                "or dtype, or another device")
            mid = (a + b) // 2
            pending[:0] = [(a, mid), (mid, b)]
            continue
        use_prefix = len(clean.kv) == engine.n_layers
        if not use_prefix and "prefix" not in engine._warned:
            engine._warned.add("prefix")
            log.warning("fast engine: no keys and values recorded for '%s'; recomputing every position "
                        "(slower, same numbers)", model.config.model_type)
        for site in sites:
            spans = _spans(site, positions[site.name][a:b], lengths[a:b], layers, engine.n_layers,
                           targets[a:b], sources[a:b], use_prefix and engine.spans)
            _patch_site_batch(engine, clean, site, layers, positions[site.name][a:b], lengths[a:b],
                              acts, a, b, target_answer[a:b], source_answer[a:b], base,
                              results[site.name], use_prefix, spans)
        bar.update(b - a)
    bar.close()
    out = {}
    for site in sites:
        data = {k: (("example", "layer"), v, {"description": METRICS[k]}) for k, v in results[site.name].items()}
        ds = xr.Dataset(data, coords={"example": pairs["example"].values, "layer": np.asarray(layers)})
        ds.attrs.update({"site": site.name, "label": site.label, "component": site.component,
                         "positions": site.positions, "js_base": base, "window": 1})
        out[site.name] = ds
    return out


def _patch_site_batch(engine, clean, site, layers, positions, lengths, acts, a, b, target_answer,
                      source_answer, base, out, use_prefix, spans):
    values = torch.from_numpy(np.ascontiguousarray(acts[f"act_{site.name}"].values[a:b])).to(
        engine.device, engine.dtype)
    layer_ids = list(range(len(layers)))
    for e, ps in enumerate(positions):  # nothing to patch (e.g. an empty relation): the target itself
        if not ps:
            same = patch_metrics(clean.target[e:e + 1], clean.target[e:e + 1], target_answer[e:e + 1],
                                 source_answer[e:e + 1], base)
            for k, v in same.items():
                out[k][a + e, :] = v.cpu().numpy()[0]
    for start, span, members, end in _site_groups(positions, lengths, use_prefix, spans):
        width = end - (start if span is None else span)
        pending = [([members[i] for i in ex], lis) for ex, lis in engine.chunks(len(members), layer_ids, width)]
        while pending:
            examples, lis = pending.pop(0)
            result = engine.with_backoff(
                lambda: engine.run_group(clean, site.component, examples, lis, layers, positions, values,
                                         start, end, span),
                len(examples) * len(lis) * width, f"site {site.label}")
            if result is None:
                if len(examples) > 1:
                    half = len(examples) // 2
                    pending[:0] = [(examples[:half], lis), (examples[half:], lis)]
                elif len(lis) > 1:
                    half = len(lis) // 2
                    pending[:0] = [(examples, lis[:half]), (examples, lis[half:])]
                else:
                    raise UserError(f"out of memory patching a single run at site {site.label}; use a "
                                    "smaller model or dtype, or another device")
                continue
            patched, order = result
            rows = torch.as_tensor([e for _ in order for e in examples], device=engine.device)
            if not torch.isfinite(patched).all():
                bad = int(torch.nonzero(~torch.isfinite(patched).all(-1))[0, 0])
                raise UserError(f"non-finite logits (NaN or inf) at site {site.label} ({site.component}@"
                                f"{site.positions}), layer {layers[order[bad // len(examples)]]}; "
                                "try dtype float32 or bfloat16")
            metrics = patch_metrics(patched, clean.target[rows], target_answer[rows], source_answer[rows], base)
            ex_index = np.asarray([a + e for _ in order for e in examples])
            li_index = np.asarray([li for li in order for _ in examples])
            for k, v in metrics.items():
                out[k][ex_index, li_index] = v.cpu().numpy()

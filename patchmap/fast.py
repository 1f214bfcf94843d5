"""The fast patching engine: many patched runs per forward, and nothing recomputed that a patch cannot change.

For a batch of examples, the unpatched target runs once through the model's own forward. Hooks record
each decoder block's input hidden state and call arguments (masks, rotary embeddings, position ids), and
a recording cache records each layer's keys and values. The patched runs then never go through the
model's forward; they go through its decoder blocks, called directly, on a schedule over layers:

- a run patched at layer l joins the batch at block l (attn, mlp: with the clean block input, and a hook
  on the component writes the source activation into that run's rows) or at block l + 1 (resid: the
  block's clean output with the source activation written in), so blocks before a run's layer are
  never recomputed for it, and every run active at a block shares one call of that block; with a patch
  window, l is the window's first layer and the source is written in again at each later layer of it;
  a knockout run (the last position's attention to the site's positions blocked) computes only the last
  position, from the window's first block on, with those keys masked in the window's blocks;
- only positions from the first patched position on (the suffix) are computed: earlier positions are
  identical to the clean run, so their keys and values come from the recording as a prefix cache (for
  a resid span after a prefix the source run shares, the source's keys and values up to the span's end);
- the last block runs its MLP at the last position only (nothing else of it feeds the output), and
  logits are computed only there (final norm and output embedding applied to that position's hidden
  state; Gemma's final softcapping included), for every site and layer of a batch in one call.

Runs are grouped by how many positions they compute, not by where they start: each row of a block call
gets its own mask (gathered from the clean run's), positions and prefix cache (padded to the longest
prefix, the padding masked), so no run computes padding. Runs are chunked to a budget of (runs x suffix
positions) per block call; an out-of-memory error (CUDA or CPU) halves the chunk and retries it, with a
warning in the log; the numbers stay the same up to float32 rounding of the smaller shapes.
The reference engine (patchmap.engine, hooks on a full forward per layer) stays the ground truth that
tests/test_fast_engine.py compares this engine with.
"""

import inspect
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm
from transformers import DynamicCache

from . import models
from .engine import _output_tensor, _with_tensor, add_hook, hooks, is_out_of_memory, pad_batch, window_layers
from .errors import UserError
from .metrics import METRICS, ROWS, patch_metrics

log = logging.getLogger(__name__)

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
DEFAULT_CPU_TOKENS = 16384
HEAD_ROWS = 4096         # patched runs per output-embedding call, at most
HEAD_ELEMENTS = 1 << 25  # and logits per call (128 MB in float32)


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
        if keys is None or keys.shape[2] == 0:
            return key_states, value_states
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)


def _positional_names(module):
    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


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
        self.mlp_modules = [models.mlp_modules(model, layer) for layer in range(len(self.blocks))]
        self.finals = models.final_modules(model)
        self.n_layers = len(self.blocks)
        # Blocks may compute on different devices (accelerate's device_map): each block's recorded inputs,
        # arguments and keys/values live on its device; ids and the runs' bookkeeping on the input
        # embedding's, logits and metrics on the output embedding's.
        self.device = models.input_device(model)
        self.block_devices = [models.module_device(b) for b in self.blocks]
        self.final_devices = [models.module_device(m) for m in self.finals]
        self.output_device = models.output_device(model)
        self.spread = len({self.device, self.output_device, *self.block_devices, *self.final_devices}) > 1
        self.dtype = next(model.parameters()).dtype
        self.max_tokens = max_tokens or self._default_tokens()
        self.fail_above = fail_above
        self.spans = spans
        self.stats = Counter()
        self._names = [_positional_names(b) for b in self.blocks]
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._warned = set()

    def _default_tokens(self):
        gpus = {d for d in self.block_devices if d.type == "cuda"}
        if not gpus:
            return DEFAULT_CPU_TOKENS
        free = min(torch.cuda.mem_get_info(d)[0] for d in gpus)
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
    def clean_run(self, sequences, pad_id, noise=None):
        """The unpatched target run (with `noise` [B, T, H], if given, added to its input embeddings)."""
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
                device = self.block_devices[layer]
                inputs[layer] = call.pop(name).to(device)
                arguments[layer] = (name, send_to_device(call, device, skip_keys=list(CACHE_ARGUMENTS)))
            return hook

        def post_hook(module, args, output):
            last["output"] = _output_tensor(output)

        handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        handles.append(self.blocks[-1].register_forward_hook(post_hook))
        if noise is not None:
            handles.append(self.model.get_input_embeddings().register_forward_hook(add_hook(noise.to(self.device))))
        cache = _RecordingCache(self.config)
        keep = {}
        # logits only at the positions some prompt ends at; not on a spread model, where accelerate moves
        # a tensor logits_to_keep to the first device, and the last hidden states may be on another
        if self._keeps_logits and not self.spread:
            keep["logits_to_keep"] = torch.unique(lengths - 1)
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                use_cache=True, **keep).logits
        finally:
            for h in handles:
                h.remove()
        self.stats["clean_tokens"] += ids.numel()
        self.stats["clean_logit_rows"] += logits.shape[0] * logits.shape[1]
        rows = torch.arange(len(lengths), device=self.device)
        columns = torch.searchsorted(keep["logits_to_keep"], lengths - 1) if keep else lengths - 1
        last_logits = logits[rows.to(logits.device), columns.to(logits.device)].float().to(self.output_device)
        if not torch.isfinite(last_logits).all():
            raise UserError("non-finite logits (NaN or inf) in the unpatched target run; "
                            "try dtype float32 or bfloat16")
        output = last["output"]
        mine = self.head(output[rows.to(output.device), (lengths - 1).to(output.device)])
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
        for module, device in zip(self.finals, self.final_devices):
            hidden = module(hidden.to(device))
        logits = self.model.get_output_embeddings()(hidden.to(self.output_device))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    # -- patched runs ----------------------------------------------------------------------------------

    def _mask(self, clean_mask, index):
        """Each row's attention mask over [its prefix, padded to index.prefix | its suffix], gathered from
        the clean run's mask (so causal, padding and sliding-window masks all carry over)."""
        if clean_mask is not None and (not torch.is_tensor(clean_mask) or clean_mask.dim() != 4):
            raise UserError(f"the fast engine needs a 4D attention mask for '{self.config.model_type}'; "
                            "use engine: reference")
        queries, keys, valid = index.positions, index.keys, index.valid
        if clean_mask is None:  # the model judged plain causal attention enough
            allowed = (keys[:, None, :] <= queries[:, :, None]) & valid[:, None, :]
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
            return mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]
        by_row = clean_mask.permute(0, 2, 3, 1)  # [B or 1, T, T, heads or 1]
        rows = index.rows_in(clean_mask)
        mask = by_row[rows[:, None, None], queries[:, :, None], keys[:, None, :]].permute(0, 3, 1, 2)
        hidden = ~valid[:, None, None, :]
        if mask.dtype == torch.bool:
            return mask & ~hidden
        return mask.masked_fill(hidden, torch.finfo(mask.dtype).min)

    def _block_arguments(self, clean, layer, index, kv, blocked=None):
        """The block's call arguments for the rows of `index`; `blocked` [R, P + W] (knockout) marks the
        keys each row's last query may not attend to."""
        if blocked is not None and "attention_mask" not in clean.arguments[layer]:
            raise UserError(f"attention knockout needs the attention mask among the block arguments of "
                            f"'{self.config.model_type}'; use engine: reference")
        out = {}
        for name, value in clean.arguments[layer].items():
            if name in CACHE_ARGUMENTS and value is not None:
                keys, values = kv or (None, None)  # None: no keys and values recorded, every prefix empty
                out[name] = _PrefixCache(None if keys is None else keys[index.examples, :, :index.prefix],
                                         None if values is None else values[index.examples, :, :index.prefix])
            elif name == "attention_mask":
                out[name] = self._mask(value, index)
                if blocked is not None:
                    out[name] = _block_last_query(out[name], blocked)
            elif name == "position_embeddings" and isinstance(value, (tuple, list)):
                out[name] = tuple(index.gather(t) for t in value)
            elif name == "position_ids" and value is not None:
                out[name] = index.gather(value)
            elif torch.is_tensor(value) or isinstance(value, (dict, tuple, list)):
                raise UserError(f"the fast engine does not know the block argument '{name}' of "
                                f"'{self.config.model_type}'; use engine: reference")
            else:
                out[name] = value
        return out

    def _call_block(self, clean, layer, hidden, index, kv, patch=None, mlp="all", record=False, blocked=None):
        """Apply block `layer` to hidden [R, W, H], runs described by `index` (RowIndex); `kv` = (keys,
        values) [B, kv heads, T, head dim] holds each example's keys and values before its suffix.
        `patch` = (module, rows, positions, values) writes the source activation into a component's
        output; `mlp` = "last" computes the MLP only at the last suffix position (all other positions of
        the last block feed nothing), "none" not at all; with `record`, also return the keys and values
        the block computed; `blocked` [R, P + W] marks keys each row's last query may not attend to."""
        device = self.block_devices[layer]
        index = index.to(device)
        kwargs = self._block_arguments(clean, layer, index, kv, blocked)
        kwargs[clean.hidden_name[layer]] = hidden = hidden.to(device)
        rows, width = hidden.shape[:2]
        if not record:
            self._inject(rows * width)
            self.stats["block_tokens"] += rows * width
            self.stats["attention_scores"] += rows * width * (index.prefix + width)
            self.stats["block_calls"] += 1
        registered = []
        if mlp == "all":
            self.stats["mlp_tokens"] += rows * width
        else:
            keep = torch.arange(width - 1, rows * width, width, device=device) if mlp == "last" \
                else torch.zeros(0, dtype=torch.long, device=device)
            self.stats["mlp_tokens"] += len(keep)
            registered = _skip_mlp_rows(self.mlp_modules[layer], keep)
        if patch is not None:
            module, prow, ppos, pval = patch

            def hook(mod, args, output):
                h = _output_tensor(output)
                shaped = h.reshape(rows, width, h.shape[-1])
                shaped = _put(shaped, (prow, ppos), pval)
                return _with_tensor(output, shaped.reshape(h.shape))
            registered.append((module, hook))
        with hooks(registered):
            output = _output_tensor(self.blocks[layer](**kwargs))
        if record:
            cache = next(v for k, v in kwargs.items() if k in CACHE_ARGUMENTS and v is not None)
            return output, cache.recorded
        return output

    @torch.no_grad()
    def span_kv(self, clean, spans, sources, first):
        """Per block from `first` on, the clean keys and values with the *source's* written in at each span
        [start, stop) of `spans` {example: (start, stop)}: a run patched with the source's resid over the
        whole span, after tokens equal in target and source, equals the source there in every later block
        (`sources`: a Sources, with the resid of every layer from first - 1 on)."""
        out = {b: (clean.kv[b][0].clone(), clean.kv[b][1].clone()) for b in range(first, self.n_layers)}
        by_width = defaultdict(list)
        for e, (start, stop) in spans.items():
            by_width[stop - start].append(e)
        for width, examples in by_width.items():
            ex = torch.as_tensor(examples, device=self.device)
            starts = [spans[e][0] for e in examples]
            index = RowIndex(ex, torch.as_tensor(starts, device=self.device), width, max(starts))
            for block in range(first, self.n_layers):
                hidden = sources.span(ex, width, block - 1).to(self.dtype)
                _, (keys, vals) = self._call_block(clean, block, hidden, index, clean.kv[block], mlp="none",
                                                   record=True)
                for kv, new in zip(out[block], (keys, vals)):
                    where = (ex[:, None].to(kv.device), index.positions.to(kv.device))
                    kv.transpose(1, 2).index_put_(where, new.transpose(1, 2).to(kv.device, kv.dtype))
        return out

    @torch.no_grad()
    def run_group(self, clean, component, group, layer_ids, layers, source, kv, window=1, site_mask=None):
        """Last-position hidden states [len(layer_ids) * len(group.examples), H] of the runs (example,
        layer) of `group` (a Group: examples sharing a suffix width), rows layer-major as in the returned
        order. The run for layer l patches every layer k of window_layers(l, window) = [a, b), writing
        `source(rows, slots, k)` in. It joins the batch at the block where its first patch happens: block
        a for attn and mlp (a hook writes the source into the component's output in blocks a .. b - 1),
        block a + 1 for resid (block a's clean output, source written in; blocks a + 1 .. b - 1 get it
        written into their outputs), so no block before a run's window is recomputed for it. Knockout
        (`site_mask` [B, T]: the site's positions): nothing is written; in blocks a .. b - 1 the last
        position may not attend to the site's positions, and the run joins at block a."""
        ex, width = group.examples, group.width
        n = len(ex)
        r_idx, p_idx, s_idx = group.writes
        rows, slots = ex[r_idx], s_idx
        into_output = component == "resid" and site_mask is None  # the source goes into block outputs
        windows = {li: window_layers(layers[li], window, self.n_layers) for li in layer_ids}
        joins = defaultdict(list)  # block index -> layer ids joining there
        for li in layer_ids:
            joins[windows[li][0] + (1 if into_output else 0)].append(li)
        full = RowIndex(ex.repeat(len(layer_ids)), group.starts.repeat(len(layer_ids)), width, group.index.prefix)
        hidden, order = None, []

        def written(runs, block):
            """(rows, positions, values) of the source written at layer `block` into the runs (indices into
            `order`) `runs`; None if nothing is written."""
            if not runs or len(r_idx) == 0:
                return None
            offsets = torch.as_tensor(runs, device=self.device).repeat_interleave(len(r_idx)) * n
            return (r_idx.repeat(len(runs)) + offsets, p_idx.repeat(len(runs)),
                    source(rows, slots, block).repeat(len(runs), 1))

        for block in range(min(joins), self.n_layers + 1):
            for li in joins.get(block, []):
                if into_output:
                    first = windows[li][0]
                    joining = group.index.gather(clean.block_output(first))
                    joining = _put(joining, (r_idx, p_idx), source(rows, slots, first))
                else:
                    joining = group.index.gather(clean.inputs[block])
                hidden = joining if hidden is None else torch.cat([hidden.to(joining.device), joining])
                order.append(li)
            if block == self.n_layers:
                break
            index = full.first(len(order) * n)
            runs = [i for i, li in enumerate(order) if block in windows[li]]  # the runs patched in this block
            patch = blocked = None
            if site_mask is not None:
                in_window = torch.zeros(len(order), dtype=torch.bool, device=self.device)
                in_window[runs] = True
                keys = index.keys.clamp(max=site_mask.shape[1] - 1)
                blocked = site_mask[index.examples[:, None], keys] & index.valid & in_window.repeat_interleave(n)[:, None]
            elif not into_output and (write := written(runs, block)) is not None:
                patch = (models.component_module(self.model, component, block), *write)
            hidden = self._call_block(clean, block, hidden, index, kv(block), patch,
                                      mlp="last" if block == self.n_layers - 1 else "all", blocked=blocked)
            if into_output and (write := written(runs, block)) is not None:  # patched again after this block
                hidden = _put(hidden, write[:2], write[2])
        self.stats["patched_runs"] += hidden.shape[0]
        self.stats["span_runs"] += hidden.shape[0] if group.span else 0
        return hidden[:, width - 1], order

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
        if any(d.type == "cuda" for d in self.block_devices):
            torch.cuda.empty_cache()
        self.max_tokens = max(1, min(self.max_tokens, size) // 2)
        self.stats["oom_retries"] += 1
        log.warning("out of memory in %s (%s); retrying in smaller chunks (token budget now %d)",
                    what, message, self.max_tokens)
        return None


def _put(tensor, indices, values):
    """tensor.index_put(indices, values), the indices and values moved to the tensor's device and dtype."""
    return tensor.index_put(tuple(i.to(tensor.device) for i in indices), values.to(tensor.device, tensor.dtype))


def _block_last_query(mask, blocked):
    """`mask` [R, heads or 1, W, K] (boolean: allowed; else additive) with the keys `blocked` [R, K]
    taken from each row's last query."""
    edges = torch.zeros((mask.shape[0], 1, mask.shape[2], mask.shape[3]), dtype=torch.bool, device=mask.device)
    edges[:, 0, -1] = blocked.to(mask.device)
    if mask.dtype == torch.bool:
        return mask & ~edges
    return mask.masked_fill(edges, torch.finfo(mask.dtype).min)


def _skip_mlp_rows(modules, keep):
    """Hooks that run the MLP (entry module .. exit module) only on the flattened token rows `keep`;
    the other rows of its output are zero. The block's output there is then wrong, and unused."""
    entry, exit_ = modules
    shape = {}

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop(next(iter(kwargs)))
        shape["full"] = x.shape
        flat = x.reshape(-1, x.shape[-1])[keep.to(x.device)]
        x = flat.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() == 3 else flat
        return ((x, *args[1:]) if args else (x,)), kwargs

    def post_hook(module, args, output):
        h = _output_tensor(output)
        full = h.new_zeros(*shape["full"][:-1], h.shape[-1])
        full.reshape(-1, h.shape[-1])[keep.to(full.device)] = h.reshape(-1, h.shape[-1])
        return _with_tensor(output, full)
    return [(entry, pre_hook, "pre"), (exit_, post_hook)]


class RowIndex:
    """Rows of a block call: row r is a run on clean example examples[r] at positions
    [starts[r], starts[r] + width); its prefix (positions before starts[r]) is read from a cache padded to
    `prefix` positions (at least the longest start, given by the caller so that no device sync is
    needed), and masked beyond starts[r]."""

    def __init__(self, examples, starts, width, prefix):
        self.examples, self.starts, self.width, self.prefix = examples, starts, width, prefix
        self.positions = starts[:, None] + torch.arange(width, device=starts.device)    # [R, W]

    def to(self, device):
        """This index with its tensors on `device` (the device of a block it is used in)."""
        if self.examples.device == device:
            return self
        return RowIndex(self.examples.to(device), self.starts.to(device), self.width, self.prefix)

    def first(self, rows):
        """The index of the first `rows` rows (runs join the batch at the end)."""
        if rows == len(self.examples):
            return self
        return RowIndex(self.examples[:rows], self.starts[:rows], self.width, self.prefix)

    @property
    def keys(self):
        prefix = torch.arange(self.prefix, device=self.starts.device).expand(len(self.examples), self.prefix)
        return torch.cat([prefix, self.positions], dim=1)                          # [R, P + W]

    @property
    def valid(self):
        prefix = torch.arange(self.prefix, device=self.starts.device)[None, :] < self.starts[:, None]
        return torch.cat([prefix, torch.ones_like(self.positions, dtype=torch.bool)], dim=1)

    def rows_in(self, tensor):
        """Each row's index into `tensor`'s first dimension: its example, or 0 where that is shared (1)."""
        return self.examples if tensor.shape[0] > 1 else torch.zeros_like(self.examples)

    def gather(self, tensor):
        """tensor [B or 1, T, ...] at each row's example and positions: [R, W, ...]."""
        return tensor[self.rows_in(tensor).to(tensor.device)[:, None], self.positions.to(tensor.device)]


@dataclass
class Group:
    """Examples of one clean batch whose runs at a site compute the same number of positions."""
    index: RowIndex           # clean-batch rows, first computed position of each, positions computed per run
    writes: tuple             # (example row, position - start, slot) of each source activation written
    span: bool                # whether these are span runs (the source sits in the prefix's keys and values)
    knockout: bool = False    # knockout runs: the last position only, nothing written

    @property
    def examples(self):
        return self.index.examples

    @property
    def starts(self):
        return self.index.starts

    @property
    def width(self):
        return self.index.width


def _groups(positions, lengths, use_prefix, spans, layer_ids, engine, knockout=False):
    """The runs of one site on one clean batch, as chunks (Group, layer ids): examples grouped by how
    many positions each run computes (length - first computed position; for knockout only the last
    position changes) and by whether the span path applies, then split to the engine's token budget."""
    by_key = defaultdict(list)
    for e, ps in enumerate(positions):
        if ps:
            span = spans[e] if spans is not None else None
            first = int(lengths[e]) - 1 if knockout else min(ps)
            start = span if span is not None else (first if use_prefix else 0)
            by_key[(int(lengths[e]) - start, span is not None)].append((e, start))
    chunks = []
    for (width, span), members in sorted(by_key.items()):
        for picked, lis in engine.chunks(len(members), layer_ids, width):
            chunks.append((_group([members[i] for i in picked], positions, width, span, engine.device, knockout),
                           lis))
    return chunks


def _group(members, positions, width, span, device, knockout=False):
    writes = ([], [], [])
    if not span and not knockout:
        for r, (e, start) in enumerate(members):
            for slot, p in enumerate(positions[e]):
                for column, value in zip(writes, (r, p - start, slot)):
                    column.append(value)
    examples = torch.as_tensor([e for e, _ in members], device=device)
    starts = torch.as_tensor([s for _, s in members], device=device)
    return Group(RowIndex(examples, starts, width, max(s for _, s in members)),
                 tuple(torch.as_tensor(w, dtype=torch.long, device=device) for w in writes), span, knockout)


def _split(group, lis, positions, device):
    """A chunk that ran out of memory, halved: by examples if it has more than one, else by layers."""
    members = list(zip(group.examples.tolist(), group.starts.tolist()))
    if len(members) > 1:
        half = len(members) // 2
        return [(_group(part, positions, group.width, group.span, device, group.knockout), lis)
                for part in (members[:half], members[half:])]
    if len(lis) > 1:
        half = len(lis) // 2
        return [(group, lis[:half]), (group, lis[half:])]
    return None


def _spans(site, positions, lengths, first, available, n_layers, same_until, use_prefix):
    """For each example, the end of its patched span if the span path applies: a resid site whose
    positions are one run [start, stop) before the last token, where target and source run the same up to
    `start` (`same_until[e]`: the first position at which they may differ, by token or by noise), with
    the source activation of every layer from the first patched one (`first`) on among the `available`
    ones (it is the input of the blocks after it). Else None. Any patch window gives the same runs as its
    first layer alone: the later layers' source activations are what the span holds there anyway."""
    if site.component != "resid" or not use_prefix or not set(range(first, n_layers - 1)) <= available:
        return None
    out = []
    for ps, n, same in zip(positions, lengths, same_until):
        ok = ps and ps == list(range(ps[0], ps[-1] + 1)) and ps[-1] + 1 < n and ps[0] <= same
        out.append(ps[-1] + 1 if ok else None)
    return out


def _same_until(pairs, targets, sources):
    """Per example, the first position where target and source runs may differ: the first differing
    token, or for the noise intervention the first noised (subject) position. Ablation values are no
    run at all (a mean or zero per layer, not one layer's output fed to the next): -1, no span path."""
    if pairs.attrs.get("intervention") == "ablate":
        return [-1] * len(targets)
    out = []
    for t, s in zip(targets, sources):
        n = min(len(t), len(s))
        out.append(next((i for i in range(n) if t[i] != s[i]), n))
    if pairs.attrs.get("intervention") == "noise":
        out = [min(o, int(start)) for o, start in zip(out, pairs["subject_start"].values)]
    return out


@torch.no_grad()
def patch_sites(model, pairs, acts, sites, layers, batch_size, pad_id, base=2.0, progress=True, window=1,
                max_tokens=None, fail_above=None, engine_object=None):
    """Per-example metrics [example, layer] for each site, as patching.patch_site returns them (the
    source patched into every layer of window_layers(layer, window)), from one clean run per batch of
    examples shared by every site. `engine_object` reuses a FastEngine (its stats then count this call
    too)."""
    import xarray as xr

    from .pairs import token_lists
    from .patching import site_positions, target_noise

    engine = engine_object or FastEngine(model, max_tokens=max_tokens, fail_above=fail_above)
    targets = token_lists(pairs, "target_ids")
    sources = token_lists(pairs, "source_ids")
    n = len(targets)
    positions = {s.name: site_positions(pairs, s) for s in sites}
    results = {s.name: {k: np.zeros((n, len(layers)), np.int8 if k == "flip" else np.float32) for k in METRICS}
               for s in sites}
    answers = [torch.as_tensor(pairs[f"{r}_answer"].values, device=engine.output_device)
               for r in ("target", "source")]
    lengths = [len(t) for t in targets]
    same_until = _same_until(pairs, targets, sources)
    windows = [window_layers(layer, window, engine.n_layers) for layer in layers]
    knockout = pairs.attrs.get("intervention") == "knockout"
    available = set() if knockout else _extracted_layers(acts, windows)
    first = min(w[0] for w in windows)
    pending = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
    bar = tqdm(total=n, desc="patch (fast)", unit="example", disable=not progress)
    while pending:
        a, b = pending.pop(0)
        noise = target_noise(pairs, a, b, max(lengths[a:b]), model.config.hidden_size)
        clean = engine.with_backoff(lambda: engine.clean_run(targets[a:b], pad_id, noise),
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
        finals = []
        for site_number, site in enumerate(sites):
            spans = None if knockout else _spans(site, positions[site.name][a:b], lengths[a:b], first, available,
                                                 engine.n_layers, same_until[a:b], use_prefix and engine.spans)
            sources = None if knockout else Sources(acts, site, a, b, engine)
            finals += _site_runs(engine, clean, site, site_number, layers, window, positions[site.name][a:b],
                                 lengths[a:b], sources, use_prefix, spans, first)
            _unpatched(clean, positions[site.name][a:b], [x[a:b] for x in answers], base, a, results[site.name])
        _score(engine, clean, finals, sites, layers, [x[a:b] for x in answers], base, a, results)
        bar.update(b - a)
    bar.close()
    out = {}
    for site in sites:
        data = {k: (("example", "layer"), v, {"description": METRICS[k]}) for k, v in results[site.name].items()}
        ds = xr.Dataset(data, coords={"example": pairs["example"].values, "layer": np.asarray(layers)})
        ds.attrs.update({"site": site.name, "label": site.label, "component": site.component,
                         "positions": site.positions, "js_base": base, "window": window})
        out[site.name] = ds
    return out


def _extracted_layers(acts, windows):
    """The layers `acts` holds source activations at; a patchmap error if a window needs another."""
    available = {int(layer) for layer in acts["layer"].values}
    missing = sorted({k for w in windows for k in w} - available)
    if missing:
        raise UserError(f"no source activations at layers {missing}, which the patch windows touch; extract "
                        "them at every layer of window_layers(layer, window)")
    return available


def _unpatched(clean, positions, answers, base, a, out):
    """Examples with nothing to patch at a site (e.g. an empty relation) get the target's own metrics."""
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


def _site_runs(engine, clean, site, site_number, layers, window, positions, lengths, sources, use_prefix, spans,
               first):
    """The last-position hidden states of every (example, layer) run of one site on one clean batch:
    a list of (site number, clean-batch rows, layer ids, hidden [R, H]). Without `sources`, the knockout
    intervention: the last position's attention to the site's positions is blocked instead."""
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
    pending = _groups(positions, lengths, use_prefix, spans, list(range(len(layers))), engine, site_mask is not None)
    finals = []
    while pending:
        group, lis = pending.pop(0)
        result = engine.with_backoff(lambda: engine.run_group(clean, site.component, group, lis, layers, sources, kv,
                                                              window, site_mask),
                                     len(group.examples) * len(lis) * group.width, f"site {site.label}")
        if result is None:
            halves = _split(group, lis, positions, engine.device)
            if halves is None:
                raise UserError(f"out of memory patching a single run at site {site.label}; use a "
                                "smaller model or dtype, or another device")
            pending[:0] = halves
            continue
        hidden, order = result
        rows = group.examples.repeat(len(order))
        layer_ids = torch.as_tensor(order, device=engine.device).repeat_interleave(len(group.examples))
        finals.append((site_number, rows, layer_ids, hidden))
    return finals


def _score(engine, clean, finals, sites, layers, answers, base, a, results):
    """Logits, their non-finite check and the metrics of every patched run of a clean batch, in chunks of
    rows (one output-embedding call for many sites and layers)."""
    if not finals:
        return
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
        finite = torch.cat([torch.isfinite(patched[r:r + ROWS]).all(-1) for r in range(0, len(patched), ROWS)])
        if not finite.all():
            bad = c + int(torch.nonzero(~finite)[0, 0])
            site = sites[int(site_of[bad])]
            raise UserError(f"non-finite logits (NaN or inf) at site {site.label} ({site.component}@"
                            f"{site.positions}), layer {layers[int(layer_ids[bad])]}; "
                            "try dtype float32 or bfloat16")
        for r in range(0, len(patched), ROWS):  # in place, in cache-sized pieces
            patched[r:r + ROWS] = torch.log_softmax(patched[r:r + ROWS], dim=-1)
        r = rows[part]
        here = r.to(patched.device)
        metrics = {k: v.cpu().numpy() for k, v in
                   patch_metrics(patched, clean.target[here], answers[0][here], answers[1][here], base).items()}
        sites_here = site_of[part].numpy()
        ex_index, li_index = a + r.cpu().numpy(), layer_ids[part].cpu().numpy()
        for number in np.unique(sites_here):
            mine = sites_here == number
            for k, v in metrics.items():
                results[sites[number].name][k][ex_index[mine], li_index[mine]] = v[mine]

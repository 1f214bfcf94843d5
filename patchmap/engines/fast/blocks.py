"""The fast engine's block mechanics: FastEngine runs the clean target once with recording hooks and
cache, then calls the decoder blocks directly on the rows of patched runs (masks, positions and prefix
caches gathered per row), with the source written in, attention edges blocked, or the MLP skipped where
nothing reads it. See the package docstring for the method."""

import inspect
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device
from transformers import DynamicCache

from ... import layouts, models
from ...errors import UserError
from ...job import window_layers
from ..hooks import add_hook, check_finite, hooks, output_tensor, pad_batch, with_tensor
from .schedule import RowIndex

log = logging.getLogger(__name__)

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
DEFAULT_CPU_TOKENS = 16384


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
        layouts.check_supported(self.config.model_type)
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
        self.warned = set()  # warnings given once per engine
        self._names = [_positional_names(b) for b in self.blocks]
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

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
            last["output"] = output_tensor(output)

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
        check_finite(last_logits, " in the unpatched target run")
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
                h = output_tensor(output)
                shaped = h.reshape(rows, width, h.shape[-1])
                shaped = _put(shaped, (prow, ppos), pval)
                return with_tensor(output, shaped.reshape(h.shape))
            registered.append((module, hook))
        with hooks(registered):
            output = output_tensor(self.blocks[layer](**kwargs))
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
        # 1. where each run joins: the first block of its window (+1 where the source goes into block outputs)
        n, width = len(group.examples), group.width
        into_output = component == "resid" and site_mask is None
        windows = {li: window_layers(layers[li], window, self.n_layers) for li in layer_ids}
        joins = defaultdict(list)  # block index -> layer ids joining there
        for li in layer_ids:
            joins[windows[li][0] + (1 if into_output else 0)].append(li)
        full = RowIndex(group.examples.repeat(len(layer_ids)), group.starts.repeat(len(layer_ids)), width,
                        group.index.prefix)
        hidden, order = None, []
        for block in range(min(joins), self.n_layers + 1):
            # 2. the runs joining here enter with the clean block input (or output, source written in)
            for li in joins.get(block, []):
                joining = self._joining(clean, group, block, windows[li][0], source, into_output)
                hidden = joining if hidden is None else torch.cat([hidden.to(joining.device), joining])
                order.append(li)
            if block == self.n_layers:
                break
            # 3. one call of the block for every active run: the source written into the component, or the
            # last query's edges blocked, in the runs whose window holds this block
            index = full.first(len(order) * n)
            runs = [i for i, li in enumerate(order) if block in windows[li]]
            patch = blocked = None
            if site_mask is not None:
                blocked = _blocked_keys(site_mask, index, runs, len(order), n)
            elif not into_output and (write := _writes(group, runs, n, source, block)) is not None:
                patch = (models.component_module(self.model, component, block), *write)
            hidden = self._call_block(clean, block, hidden, index, kv(block), patch,
                                      mlp="last" if block == self.n_layers - 1 else "all", blocked=blocked)
            # 4. a resid source is written into the block's output (the next block's input)
            if into_output and (write := _writes(group, runs, n, source, block)) is not None:
                hidden = _put(hidden, write[:2], write[2])
        self.stats["patched_runs"] += hidden.shape[0]
        self.stats["span_runs"] += hidden.shape[0] if group.span else 0
        return hidden[:, width - 1], order

    def _joining(self, clean, group, block, first, source, into_output):
        """[n, W, H]: the hidden state with which the group's runs of one layer join at `block`: the clean
        block input, or (resid) the clean output of their window's first layer with the source written in."""
        if not into_output:
            return group.index.gather(clean.inputs[block])
        rows, positions, slots = group.writes
        joining = group.index.gather(clean.block_output(first))
        return _put(joining, (rows, positions), source(group.examples[rows], slots, first))

    def shrink_budget(self, tokens):
        """After an out-of-memory error in work of `tokens` runs x positions: halve the token budget."""
        self.max_tokens = max(1, min(self.max_tokens, tokens) // 2)
        self.stats["oom_retries"] += 1
        log.warning("fast engine: token budget now %d", self.max_tokens)


def _writes(group, runs, n, source, layer):
    """(rows, positions, values) of the source written at `layer` into `runs` (indices of runs in the
    block call's order, n rows each); None if nothing is written."""
    rows, positions, slots = group.writes
    if not runs or len(rows) == 0:
        return None
    offsets = torch.as_tensor(runs, device=rows.device).repeat_interleave(len(rows)) * n
    return (rows.repeat(len(runs)) + offsets, positions.repeat(len(runs)),
            source(group.examples[rows], slots, layer).repeat(len(runs), 1))


def _blocked_keys(site_mask, index, runs, n_runs, n):
    """[R, P + W] knockout: the keys (the site's positions, `site_mask` [B, T]) that each row's last query
    may not attend to, in the runs `runs` (of n_runs, n rows each) whose window holds the block."""
    in_window = torch.zeros(n_runs, dtype=torch.bool, device=site_mask.device)
    in_window[runs] = True
    keys = index.keys.clamp(max=site_mask.shape[1] - 1)
    return site_mask[index.examples[:, None], keys] & index.valid & in_window.repeat_interleave(n)[:, None]


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
        h = output_tensor(output)
        full = h.new_zeros(*shape["full"][:-1], h.shape[-1])
        full.reshape(-1, h.shape[-1])[keep.to(full.device)] = h.reshape(-1, h.shape[-1])
        return with_tensor(output, full)
    return [(entry, pre_hook, "pre"), (exit_, post_hook)]


"""The fast engine's block mechanics: FastEngine holds the model's parts and calls its decoder blocks
directly on the rows of patched runs (masks, positions and prefix caches gathered per row), with a
component's output rewritten, attention edges blocked, or the MLP skipped where nothing reads it. See the
package docstring for the method; clean.py records the clean run these calls start from."""

import inspect
import logging
from collections import Counter, defaultdict

import torch
from transformers import DynamicCache

from ... import layouts, models
from ...errors import UserError
from ..hooks import edit_hook, hooks, only_rows, output_tensor
from .clean import CACHE_ARGUMENTS, CleanRun, positional_names, record_clean_run
from .head import OutputHead
from .kernels import computing, swaps
from .schedule import RowIndex

log = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
DEFAULT_CPU_TOKENS = 16384


class _PrefixCache(DynamicCache):
    """Given to one block call of patched runs: the clean keys and values of the positions before the
    suffix, one row per run, put in front of the suffix's own keys and values. `keys` and `values` [R, kv
    heads, P + W or more, head dim] are the rows' own gathered copies, `prefix` (P) positions of them the
    prefix: the suffix's are written over the positions after it (no second copy of the prefix)."""

    def __init__(self, keys, values, prefix):
        super().__init__()
        self.keys_values, self.prefix = (keys, values), prefix

    recorded = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.recorded = (key_states, value_states)
        keys, values = self.keys_values
        if keys is None or self.prefix == 0:
            return key_states, value_states
        end = self.prefix + key_states.shape[2]
        if keys.shape[2] < end:  # padded rows reach beyond the prompts: no room after the prefix
            return (torch.cat([keys[:, :, :self.prefix], key_states], dim=2),
                    torch.cat([values[:, :, :self.prefix], value_states], dim=2))
        keys, values = keys[:, :, :end], values[:, :, :end]
        keys[:, :, self.prefix:] = key_states
        values[:, :, self.prefix:] = value_states
        return keys, values


def rows_of(cache, examples, end):
    """Each row's own copy of its example's cache [B, kv heads, T, head dim] up to position `end`: [R, kv
    heads, end, head dim] (index_select copies whole rows, 5-6x faster here than advanced indexing); None
    for no cache."""
    return None if cache is None else torch.index_select(cache[:, :, :end], 0, examples.to(cache.device))


def write_rows(tensor: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, new_values) -> torch.Tensor:
    """`tensor` [R, W, H] with new_values(old [N, H]) -> [N, H] at (rows[i], positions[i])."""
    where = (rows.to(tensor.device), positions.to(tensor.device))
    return tensor.index_put(where, new_values(tensor[where]).to(tensor.device, tensor.dtype))


class FastEngine:
    """Patched runs of many (example, layer) combinations per block call; see the package docstring.

    `max_tokens` bounds runs x suffix positions per block call (default: from free GPU memory, or 16,384
    on the CPU). `fail_above` makes any forward over that many tokens raise an out-of-memory error, to
    test the back-off. `spans=False` turns off the source-prefix path for resid spans (span_keys_values).
    """

    def __init__(self, model, max_tokens: int = None, fail_above: int = None, spans: bool = True):
        self.model = model
        self.config = model.config
        layouts.check_supported(self.config.model_type)
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"the fast engine supports the attention implementations "
                            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}, not '{impl}'; load the model with one "
                            "of them or use engine: reference")
        self.blocks = models.blocks(model)
        self.n_layers = len(self.blocks)
        self.mlp_modules = [models.mlp_modules(model, layer) for layer in range(self.n_layers)]
        self.attention_outputs = [models.attention_output_modules(model, layer)
                                  for layer in range(self.n_layers)]
        self.final_norms = models.final_modules(model)
        # Blocks may compute on different devices (accelerate's device_map): each block's recorded inputs,
        # arguments and keys/values live on its device; ids and the runs' bookkeeping on the input
        # embedding's, logits and metrics on the output embedding's.
        self.device = models.input_device(model)
        self.block_devices = [models.module_device(b) for b in self.blocks]
        self.final_norm_devices = [models.module_device(m) for m in self.final_norms]
        self.output_device = models.output_device(model)
        # the engine's kernels (kernels.swaps): for each block call, and for the clean run (not its attention)
        self.block_swaps = [swaps(b, d) for b, d in zip(self.blocks, self.block_devices)]
        self.clean_swaps = swaps(model, self.device, attention=False)
        self.output_head = OutputHead(model, self.final_norms, self.final_norm_devices, self.output_device,
                                      getattr(self.config, "final_logit_softcapping", None))
        self.dtype = next(model.parameters()).dtype
        self.max_tokens = max_tokens or self._default_tokens()
        self.fail_above = fail_above
        self.spans = spans
        self.stats = Counter()
        self.warned = set()  # warnings given once per engine
        self.head_checked = False  # whether its head gave the model's own logits (clean.check_head)
        self.positional_names = [positional_names(b) for b in self.blocks]
        forward = inspect.signature(model.forward).parameters
        # the model's cache argument: `cache` in newer transformers (5.24), `past_key_values` in older ones (5.4
        # to 5.17); a name the model does not take is swallowed by its **kwargs, and nothing is recorded
        self.cache_keyword = next((name for name in CACHE_ARGUMENTS if name in forward), None)

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

    def inject(self, tokens: int) -> None:
        """With `fail_above`, an out-of-memory error for work over that many tokens (to test the back-off)."""
        if self.fail_above is not None and tokens > self.fail_above:
            raise torch.OutOfMemoryError(f"out of memory (injected: {tokens} tokens > {self.fail_above})")

    def clean_run(self, sequences: list, pad_id: int, noise: torch.Tensor = None) -> CleanRun:
        """The unpatched target run (with `noise` [B, T, H], if given, added to its input embeddings)."""
        return record_clean_run(self, sequences, pad_id, noise)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [R, V] from last-position hidden states [R, H] (the last block's output), valid
        until the next call (head.OutputHead reuses its buffer)."""
        return self.output_head(hidden)

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

    def _block_arguments(self, clean, layer, index, keys_values, blocked=None):
        """The block's call arguments for the rows of `index`; `blocked` [R, P + W] (knockout) marks the
        keys each row's last query may not attend to."""
        if blocked is not None and "attention_mask" not in clean.arguments[layer]:
            raise UserError(f"attention knockout needs the attention mask among the block arguments of "
                            f"'{self.config.model_type}'; use engine: reference")
        out = {}
        for name, value in clean.arguments[layer].items():
            if name in CACHE_ARGUMENTS and value is not None:
                keys, values = keys_values or (None, None)  # None: no keys and values recorded, every prefix empty
                end = index.prefix + index.width  # the suffix is written over the clean ones after the prefix
                out[name] = _PrefixCache(rows_of(keys, index.examples, end), rows_of(values, index.examples, end),
                                         index.prefix)
            elif name == "attention_mask":
                out[name] = self._mask(value, index)
                if blocked is not None:
                    out[name] = _block_last_query(out[name], blocked, index.last)
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

    def call_block(self, clean: CleanRun, layer: int, hidden: torch.Tensor, index: RowIndex, keys_values,
                   write=None, mlp: str = "all", record: bool = False, blocked: torch.Tensor = None):
        """Block `layer` applied to hidden [R, W, H], the runs of `index`; `keys_values` = (keys, values)
        [B, kv heads, T, head dim] holds each example's keys and values before its suffix. `write` =
        (component, rows, positions, new_values) rewrites the component's activation there (write_rows);
        `mlp` = "all" computes the MLP at every real position (not at the padding of narrower rows), "last"
        only at each row's last suffix position (all other positions of the last block feed nothing), "none"
        not at all; with "last" and "none" the attention's query and output projections (where they are
        modules of their own) compute only there too, as nothing else reads the attention output; `blocked`
        [R, P + W] marks keys each row's last query may not attend to. Returns the output [R, W, H], and with
        `record` also the keys and values computed."""
        device = self.block_devices[layer]
        index = index.to(device)
        kwargs = self._block_arguments(clean, layer, index, keys_values, blocked)
        kwargs[clean.hidden_names[layer]] = hidden = hidden.to(device)
        rows, width = hidden.shape[:2]
        if mlp == "all":  # at the real positions: a padded one's output feeds nothing
            keep = index.real_rows()
        elif mlp == "last":
            keep = torch.arange(0, rows * width, width, device=device) + index.last
        else:
            keep = torch.zeros(0, dtype=torch.long, device=device)
        registered = [] if keep is None else only_rows(self.mlp_modules[layer], keep)
        if write is not None:
            component, write_at, positions, new_values = write

            def rewrite(h):
                return write_rows(h.reshape(rows, width, h.shape[-1]), write_at, positions, new_values).reshape(h.shape)
            registered.append(edit_hook(self.model, component, layer, rewrite))
        # The attention output is read where the MLP runs. Its query and output projections skip the rest only
        # with "last" and "none": at real positions, the padding saved does not pay for a gather and a scatter.
        # (Registered after the edit: a head site's hook writes the output projection's whole input.)
        attention_rows = None if mlp == "all" else keep
        if attention_rows is not None:
            for module in self.attention_outputs[layer]:
                registered += only_rows((module, module), attention_rows)
        if not record:
            tokens = rows * width
            self.inject(tokens)
            self.stats.update(block_tokens=tokens, attention_scores=tokens * (index.prefix + width), block_calls=1,
                              mlp_tokens=tokens if keep is None else len(keep),
                              query_output_tokens=tokens if attention_rows is None else len(attention_rows))
        with hooks(registered), computing(self.block_swaps[layer]):
            output = output_tensor(self.blocks[layer](**kwargs))
        if record:
            cache = next(v for k, v in kwargs.items() if k in CACHE_ARGUMENTS and v is not None)
            return output, cache.recorded
        return output

    @torch.no_grad()
    def span_keys_values(self, clean: CleanRun, spans: dict, sources, first: int) -> dict:
        """Per block from `first` on, the clean keys and values with the *source's* written in at each span
        [start, stop) of `spans` {example: (start, stop)}: a run patched with the source's resid over the
        whole span, after tokens equal in target and source, equals the source there in every later block
        (`sources`: a Sources, with the resid of every layer from first - 1 on)."""
        out = {b: (clean.keys_values[b][0].clone(), clean.keys_values[b][1].clone())
               for b in range(first, self.n_layers)}
        by_width = defaultdict(list)
        for e, (start, stop) in spans.items():
            by_width[stop - start].append(e)
        for width, examples in by_width.items():
            ex = torch.as_tensor(examples, device=self.device)
            starts = [spans[e][0] for e in examples]
            index = RowIndex(ex, torch.as_tensor(starts, device=self.device), width, max(starts))
            for block in range(first, self.n_layers):
                hidden = sources.span(ex, width, block - 1).to(self.dtype)
                _, (keys, vals) = self.call_block(clean, block, hidden, index, clean.keys_values[block],
                                                  mlp="none", record=True)
                for kv, new in zip(out[block], (keys, vals)):
                    where = (ex[:, None].to(kv.device), index.positions.to(kv.device))
                    kv.transpose(1, 2).index_put_(where, new.transpose(1, 2).to(kv.device, kv.dtype))
        return out

    def shrink_budget(self, tokens: int) -> None:
        """After an out-of-memory error in work of `tokens` runs x positions: halve the token budget."""
        self.max_tokens = max(1, min(self.max_tokens, tokens) // 2)
        self.stats["oom_retries"] += 1
        log.warning("fast engine: token budget now %d", self.max_tokens)


def _block_last_query(mask, blocked, last):
    """`mask` [R, heads or 1, W, K] (boolean: allowed; else additive) with the keys `blocked` [R, K]
    taken from each row's last query (column `last` [R] of the call)."""
    edges = torch.zeros((mask.shape[0], 1, mask.shape[2], mask.shape[3]), dtype=torch.bool, device=mask.device)
    edges[torch.arange(len(edges), device=mask.device), 0, last.to(mask.device)] = blocked.to(mask.device)
    if mask.dtype == torch.bool:
        return mask & ~edges
    return mask.masked_fill(edges, torch.finfo(mask.dtype).min)

"""The clean run: the unpatched target of one batch of examples, through the model's own forward, with
hooks that record each decoder block's input and call arguments and a cache that records each layer's
keys and values. The patched runs start from what it records."""

import inspect
from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device
from transformers import DynamicCache

from ...errors import UserError
from ..hooks import check_finite, hooks, input_hook, noise_hooks, only_rows, output_tensor, pad_batch
from .kernels import computing

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _RecordingCache(DynamicCache):
    """Given to the clean run: records each layer's keys and values as the attention hands them to the
    cache (after rotary embeddings), stores nothing, so the run behaves exactly like a first forward."""

    def __init__(self, config):
        super().__init__(config=config)
        self.recorded = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # contiguous [B, kv heads, T, head dim] (GPT-2's are views of [B, T, heads, head dim]): the prefix
        # caches gathered from them are then too, which the attention's matrix products take without a copy
        self.recorded[layer_idx] = (key_states.contiguous(), value_states.contiguous())
        return key_states, value_states


def positional_names(module) -> list:
    """The names of a module's positional parameters, in order (the first is a block's hidden state)."""
    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@dataclass
class CleanRun:
    """The unpatched target run of one batch of examples."""
    lengths: torch.Tensor        # [B]
    inputs: list                 # block l's input hidden state, [B, T, H]
    last_output: torch.Tensor    # the last block's output, [B, T, H]
    arguments: list              # block l's call arguments other than the hidden state
    hidden_names: list           # the name of block l's hidden-state argument
    keys_values: dict            # layer -> (keys, values) [B, kv_heads, T, head_dim]
    last_hidden: torch.Tensor    # [B, H] the last block's output at each prompt's last position
    checked_row: int = None      # in the engine's first clean run, the row whose logits the model computed:
    model_logits: torch.Tensor = None  # [1, V] float32, which the engine's head must reproduce (check_head)

    def block_output(self, layer: int) -> torch.Tensor:
        """Block `layer`'s output [B, T, H]: the next block's input, or the last block's output."""
        return self.inputs[layer + 1] if layer + 1 < len(self.inputs) else self.last_output


@torch.no_grad()
def record_clean_run(engine, sequences: list, pad_id: int, noise=None) -> CleanRun:
    """The clean run of `sequences` (token id lists) on a FastEngine's model, with `noise` [B, T, H], if
    given, added to its input embeddings."""
    # 1. the padded batch (a test may make a forward of this many tokens run out of memory)
    ids, mask, positions, lengths = pad_batch(sequences, pad_id, engine.device)
    engine.inject(ids.numel())
    # 2. hooks that record each block's input and arguments (on the block's device) and the last output,
    # add the noise, and skip the MLP where nothing reads it
    arguments, inputs, last = [None] * engine.n_layers, [None] * engine.n_layers, {}

    def record_input(layer):
        def hook(module, args, kwargs):
            call = dict(zip(engine.positional_names[layer], args))
            call.update(kwargs)
            name = engine.positional_names[layer][0]
            device = engine.block_devices[layer]
            inputs[layer] = call.pop(name).to(device)
            arguments[layer] = (name, send_to_device(call, device, skip_keys=list(CACHE_ARGUMENTS)))
        return hook

    def record_output(module, args, output):
        last["output"] = output_tensor(output)

    recorders = [(b, record_input(i), "pre") for i, b in enumerate(engine.blocks)]
    recorders += [(engine.blocks[-1], record_output)] + noise_hooks(engine.model, noise)
    row_hooks, mlp_rows, query_output_rows = where_read(engine, mask, lengths)
    # 3. the model's own forward, on the engine's kernels (kernels.computing); its output embedding sees one
    # position (the engine's head gives every prompt's logits, with the patched runs': driver.score): in the
    # engine's first clean run the last of the first prompt as long as the batch, to check the engine's head
    # against, and none after
    cache = _RecordingCache(engine.config)
    recording = {engine.cache_keyword: cache} if engine.cache_keyword else {}
    checked_row = None if engine.head_checked else int((lengths == ids.shape[1]).nonzero()[0, 0])
    logit_positions = [(engine.model.get_output_embeddings(), last_position_of(checked_row), "pre")]
    with hooks(recorders + row_hooks + logit_positions), computing(engine.clean_swaps):
        logits = engine.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                              **recording).logits
    engine.stats["clean_tokens"] += ids.numel()
    engine.stats["clean_mlp_tokens"] += mlp_rows
    engine.stats["clean_query_output_tokens"] += query_output_rows
    engine.stats["clean_logit_rows"] += logits.shape[0] * logits.shape[1]
    # 4. each prompt's last hidden state, whose logits the engine's head computes with the patched runs'
    rows = torch.arange(len(lengths), device=engine.device)
    output = last["output"]
    last_hidden = output[rows.to(output.device), (lengths - 1).to(output.device)]
    model_logits = None if checked_row is None else logits[0, -1:].float().to(engine.output_device)  # [1, V]
    return CleanRun(lengths, inputs, output, [a[1] for a in arguments], [a[0] for a in arguments],
                    cache.recorded, last_hidden, checked_row, model_logits)


def last_position_of(row):
    """A pre-hook that gives a module ([B, T, H] -> [1, 1, H]) the last position of batch row `row` only, or
    (row None) no position: an output embedding then computes that one row of logits, or none."""
    return input_hook(lambda hidden: hidden[:, :0] if row is None else hidden[row:row + 1, -1:])


def where_read(engine, mask: torch.Tensor, lengths: torch.Tensor) -> tuple:
    """(hooks, rows the MLPs compute in all, rows the attention's query and output projections compute in
    all): hooks that compute each block's MLP only where something reads its output: at the prompts'
    positions (`mask` [B, T]), and in the last block at their last positions only (the patched runs read
    the clean run's hidden states at real positions, and its last output at the last ones); there the
    attention's query and output projections compute at the last positions only too (the keys and values
    of every position are recorded). Padded positions are masked as keys everywhere: what they hold does
    not matter."""
    real = mask.flatten().nonzero().squeeze(1)
    last = torch.arange(len(lengths), device=lengths.device) * mask.shape[1] + lengths - 1
    keep = [real] * (engine.n_layers - 1) + [last]
    pairs = [pair for layer, rows in enumerate(keep) for pair in only_rows(engine.mlp_modules[layer], rows)]
    pairs += [pair for module in engine.attention_outputs[-1] for pair in only_rows((module, module), last)]
    query_output_rows = mask.numel() * (engine.n_layers - 1) + len(last)
    return pairs, sum(len(rows) for rows in keep), query_output_rows


def target_logits(engine, clean: CleanRun, logits: torch.Tensor) -> torch.Tensor:
    """The engine head's logits [B, V] of the clean run's last hidden states, checked: finite, and in the
    engine's first clean run its checked row the model's own (check_head)."""
    check_finite(logits, " in the unpatched target run")
    if clean.checked_row is not None:
        check_head(engine, logits[clean.checked_row:clean.checked_row + 1], clean.model_logits)
        engine.head_checked = True
    return logits


def check_head(engine, mine: torch.Tensor, logits: torch.Tensor) -> None:
    """The fast engine computes logits from the last block's output itself (FastEngine.head); they must be
    the model's [R, V], up to rounding, or the engine does not know this architecture's head."""
    tolerance = (1e-4 if engine.dtype == torch.float32 else 5e-2) * (1 + float(logits.abs().max()))
    difference = float((mine - logits).abs().max())
    if difference > tolerance:
        raise UserError(f"the fast engine does not reproduce the logits of architecture "
                        f"'{engine.config.model_type}' (max difference {difference:.3g}); use engine: reference")

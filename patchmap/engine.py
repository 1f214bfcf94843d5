"""The reference patching engine: forward hooks on the model's own modules, one layer per forward.

Prompts are right-padded: with causal attention, padding after a prompt's last token cannot change
any of its positions, and position ids stay 0..n-1, so no per-architecture position handling is needed.
"""

from contextlib import contextmanager

import torch

from .errors import UserError
from .metrics import patch_metrics
from .models import component_module


def pad_batch(sequences, pad_id, device):
    """Right-padded input ids, attention mask, position ids and lengths for a list of id lists."""
    lengths = torch.tensor([len(s) for s in sequences])
    width = int(lengths.max())
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.as_tensor(s)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    positions = torch.arange(width).expand(len(sequences), width).clone()
    return ids.to(device), mask.to(device), positions.to(device), lengths.to(device)


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _with_tensor(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def hooks(pairs):
    """Register (module, forward hook) pairs for the duration of the block."""
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def replace_hook(mask, values):
    """Write `values` [B, T, H] where `mask` [B, T] is true, into a module's output. An output flattened
    to [B * T, H] (OPT's fc2) is patched in the same places and keeps its shape."""
    def hook(module, args, output):
        hidden = _output_tensor(output)
        shaped = hidden.view(*mask.shape, hidden.shape[-1])
        patched = torch.where(mask[..., None], values.to(hidden.dtype), shaped)
        return _with_tensor(output, patched.view(hidden.shape))
    return hook


def capture_hook(store, key):
    def hook(module, args, output):
        store[key] = _output_tensor(output).detach()
    return hook


@torch.no_grad()
def last_logprobs(model, ids, mask, positions, lengths, where=""):
    """float32 log-softmax of the next-token logits at each prompt's last position."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    last = logits[torch.arange(len(lengths), device=logits.device), lengths - 1].float()
    if not torch.isfinite(last).all():
        raise UserError(f"non-finite logits (NaN or inf){where}; try dtype float32 or bfloat16")
    return torch.log_softmax(last, dim=-1)


@torch.no_grad()
def capture(model, ids, mask, positions, lengths, components, layers):
    """Activations {(component, layer): [B, T, H]} of an unpatched forward, plus its last log-probs."""
    store = {}
    pairs = [(component_module(model, c, l), capture_hook(store, (c, l))) for c in components for l in layers]
    with hooks(pairs):
        logprobs = last_logprobs(model, ids, mask, positions, lengths)
    return {k: v.view(*ids.shape, v.shape[-1]) for k, v in store.items()}, logprobs


@torch.no_grad()
def patched_logprobs(model, component, layer, ids, mask, positions, lengths, patch_mask, values, where=""):
    """Last-position log-probs of the target with `values` written into `component` at `layer`."""
    with hooks([(component_module(model, component, layer), replace_hook(patch_mask, values))]):
        return last_logprobs(model, ids, mask, positions, lengths, where)


def position_mask(position_lists, width, device):
    mask = torch.zeros(len(position_lists), width, dtype=torch.bool)
    for i, ps in enumerate(position_lists):
        mask[i, ps] = True
    return mask.to(device)


@torch.no_grad()
def patch_batch(model, site, layers, target_ids, position_lists, source_values, target_answer,
                source_answer, pad_id, base=2.0):
    """Metrics for one batch of examples at one site, every layer in `layers`.

    `source_values[layer]` is a [B, T, H] tensor holding the source activation at each example's
    positions (anything elsewhere). Returns {metric: [B, len(layers)]} on the CPU.
    """
    device = next(model.parameters()).device
    ids, mask, pos, lengths = pad_batch(target_ids, pad_id, device)
    patch_mask = position_mask(position_lists, ids.shape[1], device)
    target = last_logprobs(model, ids, mask, pos, lengths, " in the unpatched target run")
    target_answer = torch.as_tensor(target_answer, device=device)
    source_answer = torch.as_tensor(source_answer, device=device)
    per_layer = []
    for layer in layers:
        values = source_values[layer].to(device)
        patched = patched_logprobs(model, site.component, layer, ids, mask, pos, lengths, patch_mask, values,
                                   f" at site {site.label} ({site.component}@{site.positions}), layer {layer}")
        per_layer.append({k: v.cpu() for k, v in patch_metrics(patched, target, target_answer,
                                                               source_answer, base).items()})
    return {k: torch.stack([m[k] for m in per_layer], dim=1) for k in per_layer[0]}

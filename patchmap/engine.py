"""The reference patching engine: forward hooks on the model's own modules, one layer per forward.

Prompts are right-padded: with causal attention, padding after a prompt's last token cannot change
any of its positions, and position ids stay 0..n-1, so no per-architecture position handling is needed.
"""

from contextlib import contextmanager

import torch

from .errors import UserError
from .metrics import patch_metrics
from .models import attention_module, blocks, component_module, input_device


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


def is_out_of_memory(error):
    """True for CUDA and CPU allocation failures (torch.OutOfMemoryError or the allocators' messages)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message
                                                or "DefaultCPUAllocator: can't allocate" in message)


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _with_tensor(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def hooks(pairs):
    """Register (module, forward hook) pairs for the duration of the block; a third item "pre" makes it
    a forward pre-hook that sees and may change the keyword arguments."""
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) if kind == ["pre"]
               else module.register_forward_hook(hook) for module, hook, *kind in pairs]
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
        patched = torch.where(mask.to(hidden.device)[..., None], values.to(hidden.device, hidden.dtype), shaped)
        return _with_tensor(output, patched.view(hidden.shape))
    return hook


def add_hook(delta):
    """Add `delta` [B, T, H] to a module's output (the noise intervention, on the input embeddings)."""
    def hook(module, args, output):
        hidden = _output_tensor(output)
        return _with_tensor(output, hidden + delta.to(hidden.device, hidden.dtype))
    return hook


def noise_hooks(model, target_noise):
    return [] if target_noise is None else [(model.get_input_embeddings(), add_hook(target_noise))]


def knockout_hook(blocked, query):
    """Block attention edges: query position `query[b]` may not attend to keys where `blocked` [B, T] is
    true. Works on the attention module's `attention_mask` keyword (None, boolean or additive)."""
    def hook(module, args, kwargs):
        if "attention_mask" not in kwargs:
            raise UserError(f"attention knockout needs an attention module that takes `attention_mask` as a "
                            f"keyword; {type(module).__name__} does not")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch, width = blocked.shape
        low = torch.finfo(hidden.dtype).min
        mask = kwargs["attention_mask"]
        if mask is None:
            causal = torch.ones(width, width, dtype=torch.bool, device=hidden.device).tril()
            mask = causal[None, None].expand(batch, 1, width, width)
        if not torch.is_tensor(mask):
            raise UserError(f"attention knockout cannot edit a {type(mask).__name__} attention mask; "
                            "load the model with the eager or sdpa attention implementation")
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(~mask, low)
        mask = mask.expand(batch, mask.shape[1], width, mask.shape[-1]).clone()
        edges = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
        edges[torch.arange(batch, device=mask.device), :, query.to(mask.device), :width] = \
            blocked.to(mask.device)[:, None, :]
        kwargs["attention_mask"] = mask.masked_fill(edges, low)
        return args, kwargs
    return hook


def capture_hook(store, key):
    def hook(module, args, output):
        store[key] = _output_tensor(output).detach()
    return hook


@torch.no_grad()
def last_logprobs(model, ids, mask, positions, lengths, where=""):
    """float32 log-softmax of the next-token logits at each prompt's last position."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    last = logits[torch.arange(len(lengths), device=logits.device), lengths.to(logits.device) - 1].float()
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


def window_layers(layer, window, n_layers):
    """The layers patched together for `layer`: [layer - window//2, layer - window//2 + window), clipped."""
    start = layer - window // 2
    return list(range(max(start, 0), min(start + window, n_layers)))


def position_mask(position_lists, width, device):
    mask = torch.zeros(len(position_lists), width, dtype=torch.bool)
    for i, ps in enumerate(position_lists):
        mask[i, ps] = True
    return mask.to(device)


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

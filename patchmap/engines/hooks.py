"""What both engines share: padded batches, forward hooks that read, replace, add to or mask a module's
activations, the last position's log-probs, and the one check for non-finite logits.

Prompts are right-padded: with causal attention, padding after a prompt's last token cannot change
any of its positions, and position ids stay 0..n-1, so no per-architecture position handling is needed.
"""

from contextlib import contextmanager

import numpy as np
import torch

from ..errors import UserError
from ..layouts import INPUT_COMPONENTS
from ..metrics import ROWS
from ..models import component_module


def pad_batch(sequences: list, pad_id: int, device) -> tuple:
    """Right-padded input ids [B, T], attention mask [B, T], position ids [B, T] and lengths [B] for a list
    of token id lists."""
    lengths = torch.tensor([len(s) for s in sequences])
    width = int(lengths.max())
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.as_tensor(s)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    positions = torch.arange(width).expand(len(sequences), width).clone()
    return ids.to(device), mask.to(device), positions.to(device), lengths.to(device)


def position_mask(position_lists: list, width: int, device) -> torch.Tensor:
    """[B, width] boolean: true at each example's positions."""
    mask = torch.zeros(len(position_lists), width, dtype=torch.bool)
    for i, ps in enumerate(position_lists):
        mask[i, ps] = True
    return mask.to(device)


def output_tensor(output):
    """A module's output hidden state (the first item of a tuple output)."""
    return output[0] if isinstance(output, tuple) else output


def with_tensor(output, tensor):
    """The module's output with its hidden state replaced by `tensor`."""
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


def only_rows(modules, keep: torch.Tensor) -> list:
    """(module, hook) pairs for `hooks` that run a computation (entry module .. exit module, e.g. the MLP)
    only on the flattened token rows `keep` [N]; the other rows of its output are zero. What it feeds there
    is then wrong, and must be unused."""
    entry, exit_ = modules
    shape = {}

    def kept_rows(x):
        shape["full"] = x.shape
        flat = x.reshape(-1, x.shape[-1])[keep.to(x.device)]
        return flat[None] if x.dim() == 3 else flat  # [1, N, H]: rows need not be as many in every sequence

    def post_hook(module, args, output):
        h = output_tensor(output)
        full = h.new_zeros(*shape["full"][:-1], h.shape[-1])
        full.reshape(-1, h.shape[-1])[keep.to(full.device)] = h.reshape(-1, h.shape[-1])
        return with_tensor(output, full)
    return [(entry, input_hook(kept_rows), "pre"), (exit_, post_hook)]


def replacing(mask, values, combine=None):
    """A function of an activation [B, T, H] that writes `values` [B, T, H] where `mask` [B, T] is true;
    with `combine`, combine(activation, values) there instead. An activation flattened to [B * T, H] (OPT's
    fc2 output) is patched in the same places and keeps its shape."""
    def replace(hidden):
        shaped = hidden.view(*mask.shape, hidden.shape[-1])
        new = values.to(hidden.device, hidden.dtype)
        if combine is not None:
            new = combine(shaped, new)
        return torch.where(mask.to(hidden.device)[..., None], new, shaped).view(hidden.shape)
    return replace


def replace_hook(mask, values, combine=None):
    """A forward hook that writes `values` [B, T, H] into a module's output where `mask` [B, T] is true
    (see replacing)."""
    replace = replacing(mask, values, combine)

    def hook(module, args, output):
        return with_tensor(output, replace(output_tensor(output)))
    return hook


def edit_hook(model, component: str, layer: int, edit) -> tuple:
    """The (module, hook[, "pre"]) entry for `hooks` that replaces the activation of `component` at `layer`
    by edit(activation): its module's output, or for a component in layouts.INPUT_COMPONENTS (head) its
    module's input (the first argument), with a forward pre-hook."""
    module = component_module(model, component, layer)
    if component not in INPUT_COMPONENTS:
        return module, lambda module, args, output: with_tensor(output, edit(output_tensor(output)))
    return module, input_hook(edit), "pre"


def input_hook(edit):
    """A forward pre-hook (for `hooks`, with "pre") that replaces a module's first input, positional or
    keyword, by edit(input)."""
    def pre_hook(module, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        name = next(iter(kwargs))
        return args, {**kwargs, name: edit(kwargs[name])}
    return pre_hook


def add_hook(delta):
    """Add `delta` [B, T, H] to a module's output (the noise intervention, on the input embeddings)."""
    def hook(module, args, output):
        hidden = output_tensor(output)
        return with_tensor(output, hidden + delta.to(hidden.device, hidden.dtype))
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


def kept(store: dict, key):
    """An edit (see edit_hook) that changes nothing and keeps the activation in store[key]."""
    def keep(hidden):
        store[key] = hidden.detach()
        return hidden
    return keep


def report_non_finite(metrics: dict, where) -> None:
    """Stop with a patchmap error if a run's divergences {metric: [R]} are NaN or inf: its logits were
    (NaN, inf or -inf anywhere in a row makes them so). `where` as for check_finite."""
    divergences = np.stack([metrics[k] for k in ("js", "kl_patched_target", "kl_target_patched")])
    finite = np.isfinite(divergences).all(0)
    if not finite.all():
        place = where(int(np.flatnonzero(~finite)[0])) if callable(where) else where
        raise UserError(f"non-finite logits (NaN or inf){place}; try dtype float32 or bfloat16")


def check_finite(logits: torch.Tensor, where) -> None:
    """Stop with a patchmap error if a row of `logits` [R, V] holds NaN or inf. `where` names the run: a
    string, or a function of the first bad row's index that returns one."""
    if not len(logits):
        return
    finite = torch.cat([torch.isfinite(logits[r:r + ROWS]).all(-1) for r in range(0, len(logits), ROWS)])
    if not finite.all():
        place = where(int(torch.nonzero(~finite)[0, 0])) if callable(where) else where
        raise UserError(f"non-finite logits (NaN or inf){place}; try dtype float32 or bfloat16")


@torch.no_grad()
def last_logits(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                where: str = "") -> torch.Tensor:
    """[B, V] float32 next-token logits at each prompt's last position (ids, mask, positions [B, T],
    lengths [B]); a patchmap error if any is NaN or inf (`where` names the run)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    last = logits[torch.arange(len(lengths), device=logits.device), lengths.to(logits.device) - 1].float()
    check_finite(last, where)
    return last


@torch.no_grad()
def last_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                  where: str = "") -> torch.Tensor:
    """[B, V] float32 log-softmax of the next-token logits at each prompt's last position."""
    return torch.log_softmax(last_logits(model, ids, mask, positions, lengths, where), dim=-1)


@torch.no_grad()
def capture(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
            components: list, layers: list) -> tuple:
    """Activations {(component, layer): [B, T, H]} of an unpatched forward, plus its last log-probs (H: the
    component's width, models.component_width)."""
    store = {}
    with hooks([edit_hook(model, c, l, kept(store, (c, l))) for c in components for l in layers]):
        logprobs = last_logprobs(model, ids, mask, positions, lengths)
    return {k: v.view(*ids.shape, v.shape[-1]) for k, v in store.items()}, logprobs


@torch.no_grad()
def patched_logits(model, component: str, layer: int, ids, mask, positions, lengths, patch_mask: torch.Tensor,
                   values: torch.Tensor, where: str = "") -> torch.Tensor:
    """[B, V] float32 last-position logits of the target with `values` [B, T, H] written into `component` at
    `layer` where `patch_mask` [B, T] is true."""
    with hooks([edit_hook(model, component, layer, replacing(patch_mask, values))]):
        return last_logits(model, ids, mask, positions, lengths, where)


def patched_logprobs(model, component: str, layer: int, ids, mask, positions, lengths, patch_mask: torch.Tensor,
                     values: torch.Tensor, where: str = "") -> torch.Tensor:
    """[B, V] the log-softmax of patched_logits."""
    return torch.log_softmax(patched_logits(model, component, layer, ids, mask, positions, lengths, patch_mask,
                                            values, where), dim=-1)

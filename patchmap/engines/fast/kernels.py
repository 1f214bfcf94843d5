"""Which kernels the fast engine's computations run on, where the model's own choice is slow for them
(`swaps`: what to put in place for a block call or the clean run; `computing`: the context that does):

- attention in block calls on the CPU: cpu_attention, softmax(Q K^T x scale + mask) V as two batched matrix
  products over all rows and heads, the query heads that share a key/value head (GQA) grouped against it
  rather than its keys and values copied per head (transformers' sdpa path copies them when a mask is given),
  scores scaled, masked and (over fewer keys than FEW_KEYS) normalised in place. torch's math backend scales
  queries and keys each into a copy and adds a pass for fully masked rows; its CPU flash kernel solves the
  calls' many small problems (a few queries against a few dozen keys) one (row, head) at a time. Registered
  with transformers' AttentionInterface and chosen through the attention's config for the call only;
- activations: transformers writes the tanh approximation of GELU (gelu_new: GPT-2, GPT-J, Phi; gelu_fast)
  as five elementwise operations, each a pass over the MLP's widest activation; torch's GELU with
  approximate="tanh" computes the same function in one. transformers calls its own fused version
  (gelu_pytorch_tanh) "equivalent to NewGELU and FastGELU but much faster", not an exact numerical match.

Both change float32 rounding only: the engines agree within tests/tolerances.py.
"""

from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.activations import FastGELUActivation, NewGELUActivation

COMPOSED_TANH_GELUS = (NewGELUActivation, FastGELUActivation)
CPU_ATTENTION = "patchmap_cpu"
UNHANDLED = ("softcap", "s_aux", "sinks", "position_bias")  # attention arguments cpu_attention leaves to sdpa
ATTENTION_FUNCTIONS = AttentionInterface()  # transformers' registry (its functions, and cpu_attention)
FEW_KEYS = 16  # cpu_attention normalises scores over fewer keys than this itself (softmax_)


def cpu_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float = None,
                  is_causal=None, **kwargs):
    """Attention of queries [R, H, W, D] over keys and values [R, KV, K, D] (H a multiple of KV; query
    head h reads key/value head h // (H / KV)) with `attention_mask` [R or 1, H or 1, W, K] (boolean:
    allowed; else added): [R, W, H, D], as transformers' attention functions return it, and no weights.
    Dropout, a missing mask, half precision and the arguments in UNHANDLED go to transformers' sdpa
    function, on torch's math backend (1.5-3x faster on these problems than the CPU flash kernel)."""
    if dropout or attention_mask is None or query.dtype != torch.float32 \
            or any(kwargs.get(name) is not None for name in UNHANDLED):
        with sdpa_kernel(SDPBackend.MATH):
            return ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, is_causal=is_causal, **kwargs)
    rows, heads, width, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scores = torch.matmul(query.reshape(rows, kv_heads, groups * width, dim), key.transpose(-1, -2))
    scores = scores.mul_(dim ** -0.5 if scaling is None else scaling).view(rows, kv_heads, groups, width, keys)
    shared = attention_mask.shape[1] == 1  # one mask for every head
    mask = attention_mask.reshape(len(attention_mask), 1 if shared else kv_heads, 1 if shared else groups, width,
                                  keys)                                                   # [R, KV, G, W, K]
    if mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores.add_(mask)
    weights = softmax_(scores).view(rows, kv_heads, groups * width, keys)
    output = torch.matmul(weights, value).view(rows, heads, width, dim)
    return output.transpose(1, 2).contiguous(), None


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax along the last axis of `scores`, in place where that axis is shorter than FEW_KEYS: there
    torch's CPU softmax ran 5-13x slower than these four passes (torch 2.13, AVX-512; 4 to 12 keys), and
    at 16 keys or more 2x faster."""
    if scores.shape[-1] >= FEW_KEYS:
        return torch.softmax(scores, dim=-1)
    scores = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(-1, keepdim=True))


ATTENTION_FUNCTIONS.register(CPU_ATTENTION, cpu_attention)


def swaps(module: torch.nn.Module, device, attention: bool = True) -> list:
    """(owner, attribute, value) to set while `module` (a decoder block, or the model) computes on `device`:
    each composed tanh GELU in it by torch's fused one; with `attention`, on the CPU, the attention
    implementation of its configs that use transformers' sdpa by cpu_attention."""
    fused = torch.nn.GELU(approximate="tanh")
    out = [(module.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2], fused)
           for path, child in module.named_modules() if isinstance(child, COMPOSED_TANH_GELUS)]
    if attention and device.type == "cpu":
        configs = {id(c): c for m in module.modules()
                   if getattr(c := getattr(m, "config", None), "_attn_implementation", None) == "sdpa"}
        out += [(c, "_attn_implementation", CPU_ATTENTION) for c in configs.values()]
    return out


@contextmanager
def computing(changes: list):
    """Within the block, each (owner, attribute, value) of `changes` (from swaps) set; the model's own put
    back after it, also on an error."""
    own = [getattr(owner, name) for owner, name, _ in changes]
    try:
        for owner, name, value in changes:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(changes, own):
            setattr(owner, name, value)

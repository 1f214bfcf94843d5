"""Which kernels the fast engine's computations run on, where the model's own choice is slow for them:

- attention: on the CPU, torch's math backend for block calls (attention_kernel);
- activations: transformers writes the tanh approximation of GELU (gelu_new: GPT-2, GPT-J, Phi; gelu_fast)
  as five elementwise operations, each a pass over the MLP's widest activation; torch's GELU with
  approximate="tanh" computes the same function in one (fused_activations, swapped in by `computing`).
  transformers calls its own fused version (gelu_pytorch_tanh) "equivalent to NewGELU and FastGELU but much
  faster", not an exact numerical match: the results differ by float32 rounding, within the engines'
  agreement (tests/tolerances.py).
"""

from contextlib import contextmanager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.activations import FastGELUActivation, NewGELUActivation

COMPOSED_TANH_GELUS = (NewGELUActivation, FastGELUActivation)


def attention_kernel(device):
    """The context for a block call's scaled_dot_product_attention: on the CPU, torch's math backend (matrix
    products over every row and head at once), which on the patched runs' many small problems (a few
    queries against a few dozen keys each) is 1.5-3x faster than the CPU flash kernel, which solves them
    one (row, head) at a time; elsewhere torch's own choice."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()


def fused_activations(module: torch.nn.Module) -> list:
    """(parent, attribute name) of each activation module inside `module` that is a composed tanh GELU."""
    return [(module.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2])
            for path, child in module.named_modules() if isinstance(child, COMPOSED_TANH_GELUS)]


@contextmanager
def computing(activations: list):
    """Within the block, each (parent, name) of `activations` (from fused_activations) computes with torch's
    fused tanh GELU; the model's own modules are put back after it, also on an error."""
    fused = torch.nn.GELU(approximate="tanh")
    own = [getattr(parent, name) for parent, name in activations]
    try:
        for parent, name in activations:
            setattr(parent, name, fused)
        yield
    finally:
        for (parent, name), module in zip(activations, own):
            setattr(parent, name, module)

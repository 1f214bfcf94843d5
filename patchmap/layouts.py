"""The model families patchmap supports: where each keeps its decoder blocks, attention and MLP modules, and
the attention's output projection (whose input holds the heads' outputs). Plain data, without torch:
checking a config's model_type needs no model."""

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Layout:
    """Where one architecture keeps its blocks (a dotted path from the model) and, inside each block,
    its attention and MLP modules. `attn` and `mlp` name the modules whose outputs are added to the
    residual stream (for Gemma 2/3 and OLMo 2 that is the norm applied after the attention or MLP).
    `final` lists the modules (dotted paths from the model, applied in order; a missing one is skipped)
    between the last block's output and the output embedding. `attention` is the attention module
    itself (it takes the attention mask), where that is not `attn`. `out_proj` is the attention's output
    projection (a dotted path from the block): its input is every head's output side by side, [..., heads
    x head dim], before the heads are mixed; None where it is not known (no head sites then). `query` is the
    attention's query projection (a dotted path from the block) where it is a module of its own, not fused
    with the keys' and values' (None there): like the output projection, each of its rows feeds the attention
    output at its own position only."""
    blocks: str
    attn: str
    mlp: str
    final: tuple = ("model.norm",)
    ffn: tuple = ("mlp", "mlp")  # the modules where the MLP's computation starts and ends
    attention: str = None
    out_proj: str = None
    query: str = None


_LLAMA_LIKE = Layout("model.layers", "self_attn", "mlp", out_proj="self_attn.o_proj", query="self_attn.q_proj")
_POST_NORM = Layout("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", attention="self_attn",
                    out_proj="self_attn.o_proj", query="self_attn.q_proj")
_GPT2_LIKE = Layout("transformer.h", "attn", "mlp", ("transformer.ln_f",), out_proj="attn.c_proj")
LAYOUTS = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE, "gemma": _LLAMA_LIKE, "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM,
    "phi": Layout("model.layers", "self_attn", "mlp", ("model.final_layernorm",), out_proj="self_attn.dense",
                  query="self_attn.q_proj"),
    "phi3": Layout("model.layers", "self_attn", "mlp", out_proj="self_attn.o_proj"),  # qkv_proj: fused
    "olmo": _LLAMA_LIKE, "olmo2": _POST_NORM,
    "gpt2": _GPT2_LIKE,
    "gptj": Layout("transformer.h", "attn", "mlp", ("transformer.ln_f",), out_proj="attn.out_proj",
                   query="attn.q_proj"),
    "gpt_neox": Layout("gpt_neox.layers", "attention", "mlp", ("gpt_neox.final_layer_norm",),
                       out_proj="attention.dense"),
    # OPT's MLP has no module of its own: fc2's output (flattened to [batch * tokens, hidden]) is added
    "opt": Layout("model.decoder.layers", "self_attn", "fc2",
                  ("model.decoder.final_layer_norm", "model.decoder.project_out"), ("fc1", "fc2"),
                  out_proj="self_attn.out_proj", query="self_attn.q_proj"),
}
INPUT_COMPONENTS = ("head",)
"""The components whose activation is the input of their module (the output projection); the others' is
its output."""


def check_supported(model_type):
    if model_type not in LAYOUTS:
        raise UserError(f"unsupported model architecture '{model_type}'; supported: "
                        + ", ".join(sorted(LAYOUTS)))

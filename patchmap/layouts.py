"""The model families patchmap supports: where each keeps its decoder blocks, attention and MLP modules.
Plain data, without torch: checking a config's model_type needs no model."""

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Layout:
    """Where one architecture keeps its blocks (a dotted path from the model) and, inside each block,
    its attention and MLP modules. `attn` and `mlp` name the modules whose outputs are added to the
    residual stream (for Gemma 2/3 and OLMo 2 that is the norm applied after the attention or MLP).
    `final` lists the modules (dotted paths from the model, applied in order; a missing one is skipped)
    between the last block's output and the output embedding. `attention` is the attention module
    itself (it takes the attention mask), where that is not `attn`."""
    blocks: str
    attn: str
    mlp: str
    final: tuple = ("model.norm",)
    ffn: tuple = ("mlp", "mlp")  # the modules where the MLP's computation starts and ends
    attention: str = None


_LLAMA_LIKE = Layout("model.layers", "self_attn", "mlp")
_POST_NORM = Layout("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", attention="self_attn")
LAYOUTS = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE, "gemma": _LLAMA_LIKE, "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM, "phi": Layout("model.layers", "self_attn", "mlp", ("model.final_layernorm",)),
    "phi3": _LLAMA_LIKE, "olmo": _LLAMA_LIKE, "olmo2": _POST_NORM,
    "gpt2": Layout("transformer.h", "attn", "mlp", ("transformer.ln_f",)),
    "gptj": Layout("transformer.h", "attn", "mlp", ("transformer.ln_f",)),
    "gpt_neox": Layout("gpt_neox.layers", "attention", "mlp", ("gpt_neox.final_layer_norm",)),
    # OPT's MLP has no module of its own: fc2's output (flattened to [batch * tokens, hidden]) is added
    "opt": Layout("model.decoder.layers", "self_attn", "fc2",
                  ("model.decoder.final_layer_norm", "model.decoder.project_out"), ("fc1", "fc2")),
}


def check_supported(model_type):
    if model_type not in LAYOUTS:
        raise UserError(f"unsupported model architecture '{model_type}'; supported: "
                        + ", ".join(sorted(LAYOUTS)))

"""Load Hugging Face causal LMs and find their decoder blocks, attention and MLP modules."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def layout_for(model):
    check_supported(model.config.model_type)
    return LAYOUTS[model.config.model_type]


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def final_modules(model):
    """The modules between the last block's output and the output embedding, in order (a path that is
    missing or None, such as OPT's project_out at most sizes, is skipped)."""
    out = []
    for path in layout_for(model).final:
        try:
            module = _get(model, path)
        except AttributeError:
            continue
        if module is not None:
            out.append(module)
    return out


def blocks(model):
    return list(_get(model, layout_for(model).blocks))


def component_module(model, component, layer):
    """The module whose output is the activation of `component` at `layer`."""
    block = blocks(model)[layer]
    layout = layout_for(model)
    return {"resid": block, "attn": _get(block, layout.attn), "mlp": _get(block, layout.mlp)}[component]


def attention_module(model, layer):
    """Block `layer`'s attention module (the one that takes the attention mask)."""
    layout = layout_for(model)
    return _get(blocks(model)[layer], layout.attention or layout.attn)


def mlp_modules(model, layer):
    """The modules where block `layer`'s MLP starts (its input: the normed hidden state) and ends."""
    block = blocks(model)[layer]
    return tuple(_get(block, name) for name in layout_for(model).ffn)


def n_layers(model):
    return len(blocks(model))


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' was asked for but no CUDA GPU is available here; "
                        "set device: cpu (or auto) in the run")
    return device


def _looks_local(name):
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.startswith("results/")


def check_fast_tokenizer(tokenizer, source):
    if not tokenizer.is_fast:
        raise UserError(f"the tokenizer of '{source}' is a slow tokenizer without offset mappings; "
                        "patchmap needs a fast tokenizer (tokenizer.json)")


def load(source, revision=None, dtype="float32", device="cpu", trust_remote_code=False, allow_pickle=False):
    """Model and tokenizer from a hub id or a local directory, through `from_pretrained`.

    Weights load from safetensors; pickled weights (.bin) only when `allow_pickle` says so."""
    device = resolve_device(device)
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise UserError(f"model path '{source}' does not exist (or is not a directory)")
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(source, **kwargs)
    check_supported(config.model_type)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype],
                                                     use_safetensors=None if allow_pickle else True, **kwargs)
    except OSError as e:
        if not allow_pickle and "safetensors" in str(e).lower():
            raise UserError(f"model '{source}' has no safetensors weights; set allow_pickle: true for it in "
                            "the config to load pickled (.bin) weights from a source you trust") from None
        raise
    model.to(device).eval()
    return model, load_tokenizer(source, revision, trust_remote_code)


def load_tokenizer(source, revision=None, trust_remote_code=False):
    """The model's fast tokenizer, right-padded (with the end-of-text token where it has no pad token)."""
    tokenizer = _load_tokenizer(source, {"revision": revision, "trust_remote_code": trust_remote_code})
    check_fast_tokenizer(tokenizer, source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _load_tokenizer(source, kwargs):
    """AutoTokenizer, except that a local checkpoint whose tokenizer_config.json declares a generic fast
    tokenizer gets exactly that: for some model types (Qwen2, Phi-3) transformers 5 would otherwise
    rebuild the tokenizer with the family's pre-tokenizer, which breaks any other tokenizer.json."""
    config_file = Path(source).expanduser() / "tokenizer_config.json"
    if config_file.is_file():
        import json
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
        if declared in GENERIC_TOKENIZERS:
            return PreTrainedTokenizerFast.from_pretrained(source, **kwargs)
    return AutoTokenizer.from_pretrained(source, **kwargs)

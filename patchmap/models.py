"""Load Hugging Face causal LMs and find their decoder blocks, attention and MLP modules."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Layout:
    """Where one architecture keeps its blocks (a dotted path from the model) and, inside each block,
    its attention and MLP modules. `mlp` names the module whose output is added to the residual."""
    blocks: str
    attn: str
    mlp: str


_LLAMA_LIKE = Layout("model.layers", "self_attn", "mlp")
LAYOUTS = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "mixtral": Layout("model.layers", "self_attn", "mlp"),
    "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE, "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE, "phi": _LLAMA_LIKE, "phi3": _LLAMA_LIKE, "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE, "gpt2": Layout("transformer.h", "attn", "mlp"),
    "gptj": Layout("transformer.h", "attn", "mlp"), "gpt_neox": Layout("gpt_neox.layers", "attention", "mlp"),
    "opt": Layout("model.decoder.layers", "self_attn", "fc2"),
}


def layout_for(model):
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        raise UserError(f"unsupported model architecture '{model_type}'; supported: "
                        + ", ".join(sorted(LAYOUTS)))
    return LAYOUTS[model_type]


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def blocks(model):
    return list(_get(model, layout_for(model).blocks))


def component_module(model, component, layer):
    """The module whose output is the activation of `component` at `layer`."""
    block = blocks(model)[layer]
    layout = layout_for(model)
    return {"resid": block, "attn": _get(block, layout.attn), "mlp": _get(block, layout.mlp)}[component]


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
    if config.model_type not in LAYOUTS:
        raise UserError(f"unsupported model architecture '{config.model_type}'; supported: "
                        + ", ".join(sorted(LAYOUTS)))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype],
                                                     use_safetensors=None if allow_pickle else True, **kwargs)
    except OSError as e:
        if not allow_pickle and "safetensors" in str(e).lower():
            raise UserError(f"model '{source}' has no safetensors weights; set allow_pickle: true for it in "
                            "the config to load pickled (.bin) weights from a source you trust") from None
        raise
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    check_fast_tokenizer(tokenizer, source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer

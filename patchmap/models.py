"""Load Hugging Face causal LMs and find their decoder blocks, attention and MLP modules, and their heads."""

import json
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .checkpoints import check_model_source
from .errors import UserError
from .layouts import LAYOUTS, check_supported

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """The module whose output is the activation of `component` at `layer`; for `head`, whose input is
    (the attention's output projection: layouts.INPUT_COMPONENTS)."""
    block = blocks(model)[layer]
    layout = layout_for(model)
    if component == "head":
        return _get(block, output_projection(model))
    return {"resid": block, "attn": _get(block, layout.attn), "mlp": _get(block, layout.mlp)}[component]


def output_projection(model) -> str:
    """The path (from a block) of the attention's output projection; a patchmap error where the family
    table does not name it."""
    path = layout_for(model).out_proj
    if path is None:
        raise UserError(f"component 'head' needs the attention's output projection of '{model.config.model_type}' "
                        "models, which patchmap's family table (patchmap/layouts.py) does not name; use component "
                        "attn, or add it there")
    return path


def head_shape(model) -> tuple:
    """(heads, head dim) of the attention's output projection's input [..., heads x head dim]: the query
    heads (models with fewer key/value heads have as many query heads as the config's attention heads)."""
    projection = component_module(model, "head", 0)
    width = getattr(projection, "in_features", None) or projection.weight.shape[0]  # Linear; GPT-2's Conv1D [in, out]
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    return heads, width // heads


def component_width(model, component) -> int:
    """The size of the last dimension of `component`'s activation: the hidden size, or for `head` every head's
    output side by side (heads x head dim, which need not be the hidden size: Gemma)."""
    if component == "head":
        heads, head_dim = head_shape(model)
        return heads * head_dim
    return model.config.hidden_size


def attention_module(model, layer):
    """Block `layer`'s attention module (the one that takes the attention mask)."""
    layout = layout_for(model)
    return _get(blocks(model)[layer], layout.attention or layout.attn)


def attention_output_modules(model, layer) -> list:
    """Block `layer`'s attention modules each of whose rows feeds the attention output at its own position
    only: its query projection, where that is a module of its own, and its output projection (where the
    family table names them). Where nothing reads the attention output, neither needs to compute."""
    block, layout = blocks(model)[layer], layout_for(model)
    return [_get(block, path) for path in (layout.query, layout.out_proj) if path is not None]


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


PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's device_map strings


def placement(device, device_map=None, max_memory=None):
    """(device_map, max_memory) for from_pretrained, so that weights load straight onto their devices.

    `cpu`, `cuda` and `cuda:N` put the whole model there. `auto` spreads it over the GPUs the job sees
    (accelerate's device_map "auto"), or the model's own `device_map` (a strategy or {module: device})
    and `max_memory` ({device: size}) when the config gives them; with no GPU and neither given, it is
    the CPU."""
    if device != "auto":
        if device_map is not None or max_memory is not None:
            log.warning("the model's device_map / max_memory apply with device: auto only; this run puts the "
                        "whole model on %s", device)
        return {"": torch.device(resolve_device(device))}, None
    if device_map is None:
        if not torch.cuda.is_available() and max_memory is None:
            return {"": "cpu"}, None
        device_map = "auto"
    if isinstance(device_map, dict):
        device_map = {module: _device_name(value) for module, value in device_map.items()}
    elif device_map not in PLACEMENT_STRATEGIES:
        raise UserError(f"device_map '{device_map}' is not a module -> device mapping or one of "
                        + ", ".join(PLACEMENT_STRATEGIES))
    return device_map, _max_memory(max_memory)


def _offload_folder(device_map):
    """A temporary folder for the weights accelerate offloads to disk, where the placement may do that."""
    never = isinstance(device_map, dict) and "disk" not in device_map.values()
    return None if never else tempfile.TemporaryDirectory(prefix="patchmap-offload-")


def _device_name(value):
    """A device_map value as accelerate takes it: a GPU index (int), 'cpu' or 'disk'."""
    if isinstance(value, int) or value in ("cpu", "disk"):
        gpu = value
    else:
        gpu = int(value.partition(":")[2] or 0)  # cuda, cuda:N
    if isinstance(gpu, int) and gpu >= torch.cuda.device_count():
        raise UserError(f"the model's device_map places modules on GPU {gpu}, but this job sees "
                        f"{torch.cuda.device_count()} CUDA GPU(s); use device: cpu or another device_map")
    return gpu


def _max_memory(max_memory):
    """{device: size} with GPU keys ('0', 'cuda:0') as the integers accelerate expects."""
    if max_memory is None:
        return None
    return {key if key in ("cpu", "disk") else int(str(key).partition(":")[2] or key): size
            for key, size in max_memory.items()}


def module_device(module):
    """The device `module` computes on: where accelerate's hooks run it (its weights may then be elsewhere,
    or on `meta` while offloaded), else where its weights are."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model):
    """Where a model's input ids go: its input embedding's device."""
    return module_device(model.get_input_embeddings())


def output_device(model):
    """Where a model's logits come out: its output embedding's device."""
    return module_device(model.get_output_embeddings())


def check_fast_tokenizer(tokenizer, source):
    if not tokenizer.is_fast:
        raise UserError(f"the tokenizer of '{source}' is a slow tokenizer without offset mappings; "
                        "patchmap needs a fast tokenizer (tokenizer.json)")


def load(source, revision=None, dtype="float32", device="cpu", trust_remote_code=False, allow_pickle=False,
         device_map=None, max_memory=None):
    """Model and tokenizer from a hub id or a local directory, through `from_pretrained`.

    Weights load from safetensors; pickled weights (.bin) only when `allow_pickle` says so. They load
    straight onto the devices that placement(device, device_map, max_memory) gives (accelerate's device_map;
    modules it offloads to disk go to a temporary folder that lives as long as the model)."""
    device_map, max_memory = placement(device, device_map, max_memory)
    source = check_model_source(source, revision, allow_pickle)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:  # a hub id or revision that is not there, gated, or needs its own code
        raise UserError(f"model '{source}' cannot be loaded: {_first_line(e)}") from None
    check_supported(config.model_type)
    try:
        offload = _offload_folder(device_map)
        model, loading = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], device_map=device_map, max_memory=max_memory,
            offload_folder=offload.name if offload else None, output_loading_info=True,
            use_safetensors=None if allow_pickle else True, **kwargs)
    except OSError as e:
        if not allow_pickle and "safetensors" in str(e).lower():
            raise UserError(f"model '{source}' has no safetensors weights; set allow_pickle: true for it in "
                            "the config to load pickled (.bin) weights from a source you trust") from None
        raise
    except RuntimeError as e:
        if "mismatch" not in str(e):
            raise
        raise UserError(f"model '{source}': the weights' shapes do not fit its config.json (a config edited, or "
                        "copied from another model); put back the checkpoint's own config.json") from None
    check_all_weights_loaded(source, loading)
    model.patchmap_offload_folder = offload  # deleted with the model
    model.eval()
    return model, load_tokenizer(source, revision, trust_remote_code)


def load_tokenizer(source, revision=None, trust_remote_code=False):
    """The model's fast tokenizer, right-padded (with the end-of-text token where it has no pad token)."""
    if source.startswith("~"):
        source = str(Path(source).expanduser())
    try:
        tokenizer = _load_tokenizer(source, {"revision": revision, "trust_remote_code": trust_remote_code})
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"the tokenizer of '{source}' cannot be loaded: {_first_line(e)}") from None
    check_fast_tokenizer(tokenizer, source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def check_all_weights_loaded(source, loading):
    """from_pretrained fills weights missing from the files with random values and only logs it."""
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise UserError(f"model '{source}': weights are missing from its weight files ({len(missing)}, first: "
                        f"{missing[0]}); the files are incomplete or belong to another model")


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _load_tokenizer(source, kwargs):
    """AutoTokenizer, except that a local checkpoint whose tokenizer_config.json declares a generic fast
    tokenizer gets exactly that: for some model types (Qwen2, Phi-3) transformers 5 would otherwise
    rebuild the tokenizer with the family's pre-tokenizer, which breaks any other tokenizer.json."""
    config_file = Path(source).expanduser() / "tokenizer_config.json"
    if config_file.is_file():
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
        if declared in GENERIC_TOKENIZERS:
            return PreTrainedTokenizerFast.from_pretrained(source, **kwargs)
    return AutoTokenizer.from_pretrained(source, **kwargs)

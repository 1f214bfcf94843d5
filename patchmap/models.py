"""Load Hugging Face causal LMs and find their decoder blocks, attention and MLP modules."""

import json
import logging
import os
import tempfile
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


def _looks_local(name):
    """A path rather than a hub id: it starts like one, or its first folder exists here."""
    return name.startswith((".", "/", "~")) or Path(name).exists() or Path(Path(name).parts[0]).is_dir()


LOADED_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json")  # what from_pretrained reads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def check_model_source(source, revision=None, allow_pickle=False):
    """The source to load, `~` expanded: a local folder whose files are all there and readable, or a
    hub id that is cached or can be fetched. Anything else is a UserError naming the folder and the fault."""
    source = os.path.expanduser(str(source))
    folder = Path(source)
    if folder.is_dir():
        check_model_folder(folder, allow_pickle)
    elif folder.exists():
        raise UserError(f"model path '{source}' is a file; give the folder that holds config.json and the weights")
    elif _looks_local(source) or not _is_hub_id(source):
        raise UserError(f"model path '{source}' does not exist (no folder {folder.resolve()})")
    else:
        check_hub_id(source, revision)
    return source


def check_model_folder(folder, allow_pickle=False):
    """Every file that from_pretrained will read is there and readable: config, weights, tokenizer."""
    names = {p.name for p in folder.iterdir()}
    if not names:
        raise UserError(f"model folder '{folder}' is empty; it should hold what save_pretrained writes "
                        "(config.json, model.safetensors and the tokenizer files)")
    if "config.json" not in names:
        raise UserError(f"model folder '{folder}' has no config.json; it should hold what save_pretrained writes")
    for name in sorted(n for n in names if n in LOADED_JSON or n.endswith(".index.json")):
        _read_json(folder / name, folder)
    model_type = _read_json(folder / "config.json", folder).get("model_type")
    if not model_type:
        raise UserError(f"model folder '{folder}': config.json names no model_type")
    check_supported(model_type)
    _check_weight_files(folder, names, allow_pickle)
    if not names & set(TOKENIZER_FILES):
        raise UserError(f"model folder '{folder}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                        "model's tokenizer there with tokenizer.save_pretrained(folder)")


def _read_json(path, folder):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"model folder '{folder}': {path.name} is not valid JSON (line {e.lineno}, column "
                        f"{e.colno}: {e.msg})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"model folder '{folder}': {path.name} cannot be read: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"model folder '{folder}': {path.name} holds a JSON {type(value).__name__}, not an object")
    return value


def _check_weight_files(folder, names, allow_pickle):
    from safetensors import SafetensorError, safe_open
    for index in sorted(n for n in names if n.endswith(".index.json")):
        shards = set(_read_json(folder / index, folder).get("weight_map", {}).values())
        missing = sorted(shards - names)
        if missing:
            raise UserError(f"model folder '{folder}': {index} lists weight file '{missing[0]}', which is missing")
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    pickled = sorted(n for n in names if n.endswith(".bin") and n != "training_args.bin")
    if not safetensors and not pickled:
        raise UserError(f"model folder '{folder}' has no weight files (model.safetensors, or pickled "
                        "pytorch_model.bin); save the model there with model.save_pretrained(folder)")
    if not safetensors and not allow_pickle:
        raise UserError(f"model '{folder}' has no safetensors weights; set allow_pickle: true for it in "
                        "the config to load pickled (.bin) weights from a source you trust")
    for name in safetensors:
        try:
            with safe_open(folder / name, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"model folder '{folder}': {name} is damaged or incomplete ({e}); copy or save it "
                            "again") from None


def _is_hub_id(name):
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub_id(repo_id, revision=None):
    """A hub id that is not in the local cache must be fetched: refuse at once when the hub is offline or
    cannot be reached, instead of retrying for half a minute."""
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return
    where = (f"model '{repo_id}' is not a local folder (no folder {Path(repo_id).resolve()}), and as a Hugging "
             "Face hub id")
    if is_offline_mode():
        raise UserError(f"{where} it is not in the local cache ({constants.HF_HUB_CACHE}) and the hub is offline "
                        "(HF_HUB_OFFLINE=1); download it on a machine with network, or give a local folder")
    unreachable = _hub_unreachable(constants.ENDPOINT)
    if unreachable:
        raise UserError(f"{where} it is not in the local cache ({constants.HF_HUB_CACHE}) and the hub "
                        f"({constants.ENDPOINT}) cannot be reached: {unreachable}")


def _hub_unreachable(endpoint, timeout=5):
    """Why the hub cannot be reached (no DNS, no route), or None. Behind a proxy the hub library decides."""
    import socket
    from urllib.parse import urlparse
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return str(e)
    return None


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

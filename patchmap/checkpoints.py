"""Checks on a model's source before anything loads it: a local checkpoint folder holds every file that
`from_pretrained` reads, readable and whole; a hub id is cached or the hub can be reached. Without torch
or transformers, so that the model_identity job starts in a second."""

import json
import os
from pathlib import Path

from .errors import UserError
from .layouts import check_supported


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
            with safe_open(folder / name, "numpy"):  # reads the header and index only (numpy: no torch)
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

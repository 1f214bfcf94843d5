"""Facts: dataset files read and checked (ROME's known_1000 JSON list, or JSON Lines), downloaded, and
written in the project's own form (results/datasets/{dataset}/facts.jsonl)."""

import hashlib
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UserError
from .storage import DISK_FULL, atomic_path

REQUIRED_FIELDS = ("subject", "prompt", "attribute")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


OPTIONAL_FIELDS = {"relation": (str, int), "relation_id": (str, int), "id": (str, int), "known_id": (str, int)}


def _type_name(value):
    return {dict: "an object", list: "a list", bool: "true/false", type(None): "null", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _check_fact(row, where):
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with {', '.join(REQUIRED_FIELDS)}, found {_type_name(row)}")
    if not set(REQUIRED_FIELDS) & set(row):
        raise UserError(f"{where}: expected an object with {', '.join(REQUIRED_FIELDS)}, found an object "
                        f"with keys: {', '.join(map(str, list(row)[:5])) or '(none)'}")
    for field in REQUIRED_FIELDS:
        value = row.get(field)
        if field in row and not isinstance(value, str):
            raise UserError(f"{where}: field '{field}' must be a string, not {_type_name(value)}")
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: field '{field}' is missing or empty")
    for field, types in OPTIONAL_FIELDS.items():
        value = row.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise UserError(f"{where}: field '{field}' must be a string or an integer, not {_type_name(value)}")
    return row


def normalise_fact(row, index):
    """A fact in the project's own form: id, subject, relation, prompt, attribute."""
    fact_id = row.get("id", row.get("known_id", index))
    relation = row.get("relation", row.get("relation_id"))
    return {"id": str(fact_id), "subject": row["subject"], "relation": "" if relation is None else str(relation),
            "prompt": row["prompt"], "attribute": row["attribute"].strip()}


def check_facts(rows, where, labels=None):
    """Facts in the project's form from a list of rows (dicts), each checked; ids unique; at least one.
    `where` names the source in messages, `labels` each row (default: record 0, record 1, ...)."""
    if not isinstance(rows, (list, tuple)):
        raise UserError(f"{where}: expected a list of facts, found {_type_name(rows)}")
    labels = labels or [f"record {i}" for i in range(len(rows))]
    facts = [normalise_fact(_check_fact(row, f"{where}: {label}"), i)
             for i, (row, label) in enumerate(zip(rows, labels))]
    if not facts:
        raise UserError(f"{where}: there are no facts")
    first = {}
    for fact, label in zip(facts, labels):
        if fact["id"] in first:
            raise UserError(f"{where}: fact id '{fact['id']}' is used twice ({first[fact['id']]} and {label}); "
                            "ids must be unique")
        first[fact["id"]] = label
    return facts


def read_text(path):
    """A dataset file's text: UTF-8, with or without a byte-order mark; a bad byte is named by line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"dataset path '{path}' is a folder; give the dataset file (JSON or JSON Lines)")
    if not path.exists():
        raise UserError(f"dataset file '{path}' does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, byte {column} of the "
                        "line; save the file as UTF-8") from None


def read_facts(path):
    """Facts from a JSON list (the ROME known_1000 format) or JSON Lines; bad rows named by line."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return check_facts(rows, str(path))
    rows, labels = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            labels.append(f"line {lineno}")
        except json.JSONDecodeError as e:
            _refuse_whole_file_value(text, path)
            raise UserError(f"{path}: line {lineno} is not valid JSON: {e.msg}") from None
    return check_facts(rows, str(path), labels)


def _refuse_whole_file_value(text, path):
    """A file that is one JSON value spread over lines (an object, say) is neither a list nor JSON Lines."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    keys = f" (keys: {', '.join(list(value)[:5])})" if isinstance(value, dict) else ""
    raise UserError(f"{path}: the file holds {_type_name(value)}{keys}; expected a JSON list of facts, or JSON "
                    "Lines with one fact per line")


def check_sha256(path, expected, what=None):
    """The file's sha256; a UserError naming `what` (default: the path) if it is not the expected one."""
    actual = sha256_file(path)
    if expected and actual != expected:
        raise UserError(f"{what or path}: sha256 is {actual}, but the config expects {expected}; the file changed, "
                        "or the config's sha256 is for another copy")
    return actual


def download(url, out, expected_sha256=None, what=None):
    """Fetch `url` (http, https or file) into `out` atomically; check its sha256 when one is expected.
    `what` names the download in messages (default: the url)."""
    with atomic_path(out) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=120) as response, open(tmp, "wb") as fh:
                shutil.copyfileobj(response, fh)
        except (urllib.error.URLError, OSError) as e:
            if getattr(e, "errno", None) in DISK_FULL:
                raise  # reported by atomic_path as a full disk
            raise UserError(f"could not download {url}: {getattr(e, 'reason', e)}; download it by hand and "
                            "give its local path as the dataset's `path` instead") from None
        return check_sha256(tmp, expected_sha256, what or url)


def write_jsonl(rows, path):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]

"""Facts: reading datasets, and locating subject tokens from the tokenizer's character offsets."""

import hashlib
import json
import re
from pathlib import Path

from .errors import UserError

REQUIRED_FIELDS = ("subject", "prompt", "attribute")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_fact(row, where):
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with {', '.join(REQUIRED_FIELDS)}")
    for field in REQUIRED_FIELDS:
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: field '{field}' is missing or empty")
    return row


def normalise_fact(row, index):
    """A fact in the project's own form: id, subject, relation, prompt, attribute."""
    fact_id = row.get("id", row.get("known_id", index))
    return {"id": str(fact_id), "subject": row["subject"], "relation": str(row.get("relation", row.get("relation_id", ""))),
            "prompt": row["prompt"], "attribute": row["attribute"].strip()}


def read_facts(path):
    """Facts from a JSON list (the ROME known_1000 format) or JSON Lines; bad rows named by line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        rows = [_check_fact(r, f"{path}: record {i}") for i, r in enumerate(rows)]
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno} is not valid JSON: {e.msg}") from None
            rows.append(_check_fact(row, f"{path}: line {lineno}"))
    facts = [normalise_fact(r, i) for i, r in enumerate(rows)]
    ids = [f["id"] for f in facts]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: fact ids are not unique")
    return facts


def check_sha256(path, expected):
    actual = sha256_file(path)
    if expected and actual != expected:
        raise UserError(f"{path}: sha256 is {actual}, but the config expects {expected}; the file changed, "
                        "or the config's sha256 is for another copy")
    return actual


def download(url, out, expected_sha256=None):
    """Fetch `url` (http, https or file) into `out` atomically; check its sha256 when one is expected."""
    import shutil
    import urllib.error
    import urllib.request

    from .storage import atomic_path
    with atomic_path(out) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=120) as response, open(tmp, "wb") as fh:
                shutil.copyfileobj(response, fh)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"could not download {url}: {getattr(e, 'reason', e)}; download it by hand and "
                            "give its local path as the dataset's `path` instead") from None
        return check_sha256(tmp, expected_sha256)


def write_jsonl(rows, path):
    from .storage import atomic_path
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def subject_char_span(prompt, subject, offsets):
    """Characters of the subject in the prompt: the first occurrence that starts and ends on token
    boundaries (so 'Paris' is not found inside 'Parisian'), else the first occurrence at all."""
    starts = {a for a, b in offsets if b > a}
    ends = {b for a, b in offsets if b > a}
    matches = [m.span() for m in re.finditer(re.escape(subject), prompt)]
    if not matches:
        return None
    aligned = [(a, b) for a, b in matches if a in starts and b in ends]
    return (aligned or matches)[0]


def subject_token_span(prompt, subject, offsets):
    """[start, end) token indices of the subject, from character offsets; None if absent."""
    chars = subject_char_span(prompt, subject, offsets)
    if chars is None:
        return None
    a, b = chars
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
    return (inside[0], inside[-1] + 1) if inside else None

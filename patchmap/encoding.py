"""Facts as the model sees them: token ids, the subject's token span (from the tokenizer's character
offsets, never by matching decoded strings) and the answer's first token; prompts longer than the model's
positions are dropped. Both the predictions and the pairs stages start here."""

import logging
import re

from .errors import UserError

log = logging.getLogger(__name__)
PAD = -1  # padding in stored token-id arrays (pairs.nc's target_ids, source_ids)


def answer_token_id(tokenizer, prompt_ids, full_ids, attribute):
    """First token of the attribute as the model sees it after the prompt."""
    if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids)]
    return tokenizer(" " + attribute, add_special_tokens=False)["input_ids"][0]


def encode_facts(tokenizer, facts, missing_subject="drop"):
    """Token ids, subject span and answer token of each fact; facts whose subject is not in the
    prompt are dropped (and counted) or fatal, as the config says. Returns (encoded facts, dropped)."""
    enc = tokenizer([f["prompt"] for f in facts], return_offsets_mapping=True)
    full = tokenizer([f["prompt"] + " " + f["attribute"] for f in facts])["input_ids"]
    encoded, missing = [], []
    for fact, ids, offsets, full_ids in zip(facts, enc["input_ids"], enc["offset_mapping"], full):
        span = subject_token_span(fact["prompt"], fact["subject"], offsets)
        if span is None:
            if missing_subject == "error":
                raise UserError(f"fact {fact['id']}: subject '{fact['subject']}' does not occur in its "
                                f"prompt '{fact['prompt']}'")
            missing.append(fact["id"])
            continue
        encoded.append({**fact, "ids": list(ids), "span": span,
                        "answer": answer_token_id(tokenizer, list(ids), list(full_ids), fact["attribute"])})
    if missing:
        log.warning("dropped %d facts whose subject does not occur in the prompt (first: %s)",
                    len(missing), ", ".join(missing[:5]))
    return encoded, len(missing)


def max_positions(model_config):
    """The longest input the model's position embeddings allow, or None where the config sets no limit."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def drop_too_long(encoded, limit):
    """The encoded facts whose prompt fits in `limit` tokens (all of them if limit is None), and how many
    were dropped: a longer prompt would run past the model's position embeddings."""
    kept = encoded if limit is None else [f for f in encoded if len(f["ids"]) <= limit]
    if len(kept) < len(encoded):
        log.warning("dropped %d facts whose prompt is longer than the model's %d positions (first: %s)",
                    len(encoded) - len(kept), limit,
                    ", ".join([f["id"] for f in encoded if len(f["ids"]) > limit][:5]))
    return kept, len(encoded) - len(kept)


def token_table(tokenizer, results, pairs):
    """token_text [token_id]: the decoded text of every token id that `results` (top_token,
    target_top_token) and `pairs` (the answers) name, so that a result file reads without the tokenizer."""
    import numpy as np
    import xarray as xr
    named = [results[v].values.ravel() for v in ("top_token", "target_top_token") if v in results]
    named += [pairs[v].values.ravel() for v in ("target_answer", "source_answer")]
    ids = np.unique(np.concatenate(named)).astype(np.int64)
    texts = np.array([tokenizer.decode([int(i)]) for i in ids], dtype=object)
    table = xr.Dataset({"token_text": (("token_id",), texts, {"description": "the token's decoded text"})},
                       coords={"token_id": ids})
    table["token_id"].attrs["description"] = "token id in the model's vocabulary"
    return table


def token_lists(ds, variable):
    """The unpadded token ids of each example of a pairs dataset (`target_ids` or `source_ids`)."""
    return [row[:n].tolist() for row, n in zip(ds[variable].values, ds["length"].values)]


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

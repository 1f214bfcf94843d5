"""Pairs: each target fact with its source (the intervention's choice of partner), as the pairs dataset
(results/{run}/pairs.nc): tokenised target and source, subject span, answers, the model's predictions, and
the counts of facts kept and dropped.

Two ways make them: the workflow's, from the predictions of every fact made once per model and dataset
(pairs_from_predictions: the tokenizer only), and the Python API's, which predicts only the facts that
pairing needs (make_pairs)."""

import logging

import numpy as np
import xarray as xr

from .encoding import PAD, drop_too_long, encode_facts, max_positions
from .errors import UserError
from .interventions import Swap, outside_subject
from .predictions import attach_predictions, baseline_predictions, is_known, std_from_moments, subject_embedding_std
from .shards import SHORTFALL, shortfall

log = logging.getLogger(__name__)


def pairs_differing_outside_subject(encoded, pairs):
    """How many (target, source) pairs differ at some token outside the subject span."""
    return sum(outside_subject(encoded[i]) != outside_subject(encoded[j]) for i, j in pairs)


def pair_counts(facts, dropped_subject_not_in_prompt, dropped_too_long, dropped_not_known, not_predicted,
                dropped_no_partner, candidates, pairs, examples_requested):
    """The counts that pairs.nc and divergence.nc record (count_* attributes), in their order."""
    return {"facts": facts, "dropped_subject_not_in_prompt": dropped_subject_not_in_prompt,
            "dropped_too_long": dropped_too_long, "dropped_not_known": dropped_not_known,
            "not_predicted": not_predicted, "dropped_no_partner": dropped_no_partner, "pairs": len(pairs),
            "examples_requested": examples_requested,
            "pairs_differing_outside_subject": pairs_differing_outside_subject(candidates, pairs)}


def pairs_from_predictions(tokenizer, facts, predictions, examples, seed, known_only=True, missing_subject="drop",
                           intervention=Swap()):
    """The pairs dataset from the tokenizer and a predictions dataset (patchmap.predictions.predict_facts)
    of every fact: no model needed. The workflow's way."""
    encoded, n_missing = encode_facts(tokenizer, facts, missing_subject)
    encoded, n_too_long = drop_too_long(encoded, int(predictions.attrs.get("max_positions", 0)) or None)
    attach_predictions(encoded, predictions)
    candidates = [f for f in encoded if is_known(f)] if known_only else encoded
    pairs, no_partner = intervention.partners(candidates, examples, seed)
    counts = pair_counts(len(facts), n_missing, n_too_long, len(encoded) - len(candidates), 0, no_partner,
                         candidates, pairs, examples)
    return pairs_dataset(candidates, pairs, counts, seed, known_only, intervention,
                         subject_std=lambda: std_from_moments(candidates))


def make_pairs(model, tokenizer, facts, examples, seed, known_only=True, missing_subject="drop", batch_size=32,
               intervention=Swap()):
    """The pairs dataset, predicting only what pairing needs: with `known_only`, facts are predicted in
    chunks (in the given order) until `examples` pairs of known facts are found; without it, only the
    chosen targets and sources are predicted. The Python API's way."""
    encoded, n_missing = encode_facts(tokenizer, facts, missing_subject)
    encoded, n_too_long = drop_too_long(encoded, max_positions(model.config))
    choose = _known_pairs_in_chunks if known_only else _pairs_then_predictions
    candidates, pairs, no_partner, predicted = choose(model, encoded, tokenizer.pad_token_id, batch_size,
                                                      intervention, examples, seed)
    counts = pair_counts(len(facts), n_missing, n_too_long, predicted - len(candidates) if known_only else 0,
                         len(encoded) - predicted, no_partner, candidates, pairs, examples)
    return pairs_dataset(candidates, pairs, counts, seed, known_only, intervention,
                         subject_std=lambda: subject_embedding_std(model, candidates))


def _known_pairs_in_chunks(model, encoded, pad_id, batch_size, intervention, examples, seed):
    """Predict facts in chunks (doubling) until the known ones give `examples` pairs, or all are predicted."""
    chunk, predicted = max(batch_size, 2 * examples), 0
    while True:
        baseline_predictions(model, encoded[predicted:predicted + chunk], pad_id, batch_size)
        predicted = min(predicted + chunk, len(encoded))
        known = [f for f in encoded[:predicted] if is_known(f)]
        pairs, no_partner = intervention.partners(known, examples, seed)
        if len(pairs) == examples or predicted == len(encoded):
            return known, pairs, no_partner, predicted
        chunk *= 2


def _pairs_then_predictions(model, encoded, pad_id, batch_size, intervention, examples, seed):
    """Pair every fact, then predict only the chosen targets and sources (their baselines)."""
    pairs, no_partner = intervention.partners(encoded, examples, seed)
    used = sorted({i for pair in pairs for i in pair})
    baseline_predictions(model, [encoded[i] for i in used], pad_id, batch_size)
    return encoded, pairs, no_partner, len(used)


def _padded(rows, width):
    out = np.full((len(rows), width), PAD, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def pairs_dataset(known, pairs, counts, seed, known_only, intervention, subject_std):
    """The pairs dataset: tokenised targets and sources, subject spans, answers, baselines, counts, and
    what the intervention records (noise: each example's noise seed, and the noise's scale from
    `subject_std()`, the std of the subject embeddings over the candidate facts)."""
    log.info("pairs: %s", counts)
    if not pairs:
        raise UserError(f"no pairs left after filtering and pairing ({counts}); use more facts, "
                        "or set known_only: false for a model that does not know them")
    targets = [known[i] for i, _ in pairs]
    sources = [known[j] for _, j in pairs]
    width = max(len(f["ids"]) for f in targets)
    ex = ("example",)
    data = {
        "target_ids": (("example", "token"), _padded([f["ids"] for f in targets], width)),
        "source_ids": (("example", "token"), _padded([f["ids"] for f in sources], width)),
        "length": (ex, np.array([len(f["ids"]) for f in targets], dtype=np.int32)),
        "subject_start": (ex, np.array([f["span"][0] for f in targets], dtype=np.int32)),
        "subject_end": (ex, np.array([f["span"][1] for f in targets], dtype=np.int32)),
    }
    for role, rows in (("target", targets), ("source", sources)):
        data[f"{role}_answer"] = (ex, np.array([f["answer"] for f in rows], dtype=np.int64))
        data[f"{role}_top1"] = (ex, np.array([f["top1"] for f in rows], dtype=np.int64))
        data[f"{role}_p_answer"] = (ex, np.array([f["p_answer"] for f in rows], dtype=np.float32))
        for field in ("id", "prompt", "subject", "attribute"):
            data[f"{role}_{field}"] = (ex, np.array([f[field] for f in rows], dtype=object))
    data["relation"] = (ex, np.array([f["relation"] for f in targets], dtype=object))
    ds = xr.Dataset(data, coords={"example": [f["id"] for f in targets]})
    ds.attrs.update({f"count_{k}": v for k, v in counts.items()})
    fewer = shortfall(counts["examples_requested"], counts["pairs"], counts["facts"])
    if fewer:
        log.warning(fewer)
        ds.attrs[SHORTFALL] = fewer
    ds.attrs.update({"intervention": intervention.name, "seed": seed, "known_only": int(known_only),
                     "token_padding": PAD})
    variables, attributes = intervention.pairs_fields(seed, len(pairs), subject_std)
    ds.attrs.update(attributes)
    for name, variable in variables.items():
        ds[name] = variable
    ds["target_ids"].attrs["description"] = "token ids of the target prompt, padded with -1"
    ds["source_ids"].attrs["description"] = "token ids of the source prompt, padded with -1"
    ds["subject_start"].attrs["description"] = "first subject token (same in target and source)"
    ds["subject_end"].attrs["description"] = "one past the last subject token"
    return ds

"""Pairs: tokenise facts, find subjects, record baseline predictions, and pair each target with its source
(the partner choice is the intervention's, patchmap.interventions)."""

import functools
import logging

import numpy as np
import torch
import xarray as xr

from . import models
from .data import subject_token_span
from .engines.hooks import last_logprobs, pad_batch
from .errors import UserError
from .interventions import named, outside_subject

log = logging.getLogger(__name__)
PAD = -1  # padding in stored token-id arrays


def answer_token_id(tokenizer, prompt_ids, full_ids, attribute):
    """First token of the attribute as the model sees it after the prompt."""
    if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids)]
    return tokenizer(" " + attribute, add_special_tokens=False)["input_ids"][0]


def encode_facts(tokenizer, facts, missing_subject="drop"):
    """Token ids, subject span and answer token of each fact; facts whose subject is not in the
    prompt are dropped (and counted) or fatal, as the config says."""
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


@torch.no_grad()
def baseline_predictions(model, encoded, pad_id, batch_size):
    """Top-1 token and probability of the answer for each unpatched prompt."""
    device = models.input_device(model)
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        ids, mask, pos, lengths = pad_batch([f["ids"] for f in chunk], pad_id, device)
        logprobs = last_logprobs(model, ids, mask, pos, lengths, " in a baseline (unpatched) run")
        answers = torch.tensor([f["answer"] for f in chunk], device=logprobs.device)
        p_answer = logprobs[torch.arange(len(chunk), device=logprobs.device), answers].exp()
        for f, top, p in zip(chunk, logprobs.argmax(-1).tolist(), p_answer.tolist()):
            f["top1"], f["p_answer"] = top, p


@torch.no_grad()
def subject_embedding_moments(model, encoded):
    """Per fact: count, sum and sum of squares (float64) of its subject tokens' input embedding values,
    from which the std over any set of facts follows exactly (noise_std_from_moments)."""
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    for f in encoded:
        ids = torch.tensor(f["ids"][f["span"][0]:f["span"][1]], device=device)
        values = embeddings(ids).double()
        f["emb_count"], f["emb_sum"], f["emb_sumsq"] = values.numel(), values.sum().item(), (values ** 2).sum().item()


def std_from_moments(facts):
    """Standard deviation (n - 1 in the denominator, as torch.std) of the subject embedding values of
    `facts`, from their moments."""
    n = sum(f["emb_count"] for f in facts)
    total, squares = sum(f["emb_sum"] for f in facts), sum(f["emb_sumsq"] for f in facts)
    return float(np.sqrt(max(squares - total * total / n, 0.0) / (n - 1)))


def predict_facts(model, tokenizer, facts, batch_size):
    """results/predictions/...: each fact's answer token, the model's top-1 token and the answer's
    probability after the prompt, and the moments of its subject embeddings (for the noise scale).
    Facts whose subject is not in the prompt get no prediction (pairing drops or refuses them)."""
    limit = max_positions(model.config)
    encoded, _ = drop_too_long(encode_facts(tokenizer, facts, "drop")[0], limit)
    baseline_predictions(model, encoded, tokenizer.pad_token_id, batch_size)
    subject_embedding_moments(model, encoded)
    fact = ("fact",)
    data = {
        "answer": (fact, np.array([f["answer"] for f in encoded], dtype=np.int64),
                   {"description": "first token of the attribute after the prompt"}),
        "top1": (fact, np.array([f["top1"] for f in encoded], dtype=np.int64),
                 {"description": "the model's most probable next token after the prompt"}),
        "p_answer": (fact, np.array([f["p_answer"] for f in encoded], dtype=np.float32),
                     {"description": "probability of the answer token after the prompt", "units": "probability"}),
        "subject_embedding_count": (fact, np.array([f["emb_count"] for f in encoded], dtype=np.int64),
                                    {"description": "number of subject token embedding values"}),
        "subject_embedding_sum": (fact, np.array([f["emb_sum"] for f in encoded], dtype=np.float64),
                                  {"description": "sum of the subject tokens' input embedding values"}),
        "subject_embedding_sumsq": (fact, np.array([f["emb_sumsq"] for f in encoded], dtype=np.float64),
                                    {"description": "sum of squares of the subject tokens' input embedding values"}),
    }
    ds = xr.Dataset(data, coords={"fact": np.array([f["id"] for f in encoded], dtype=object)})
    ds["fact"].attrs["description"] = "fact id"
    ds.attrs["max_positions"] = limit or 0  # facts with longer prompts have no prediction (0: no limit)
    return ds


PREDICTED_FIELDS = {"top1": "top1", "p_answer": "p_answer", "emb_count": "subject_embedding_count",
                    "emb_sum": "subject_embedding_sum", "emb_sumsq": "subject_embedding_sumsq"}


def attach_predictions(encoded, predictions):
    """Copy each encoded fact's prediction from a predictions dataset (predict_facts), by fact id."""
    row = {str(fact): i for i, fact in enumerate(predictions["fact"].values)}
    columns = {field: predictions[var].values for field, var in PREDICTED_FIELDS.items()}
    for f in encoded:
        i = row.get(str(f["id"]))
        if i is None:
            raise UserError(f"fact {f['id']} has no prediction in the predictions file; delete it to redo it")
        for field, values in columns.items():
            f[field] = values[i].item()
        if int(predictions["answer"].values[i]) != f["answer"]:
            raise UserError(f"fact {f['id']}: the predictions file was made with another tokenizer; delete it "
                            "to redo it")


def pairs_differing_outside_subject(encoded, pairs):
    """How many (target, source) pairs differ at some token outside the subject span."""
    return sum(outside_subject(encoded[i]) != outside_subject(encoded[j]) for i, j in pairs)


@torch.no_grad()
def subject_embedding_std(model, encoded):
    """Standard deviation of the input embeddings of every subject token in the facts (ROME's scale)."""
    ids = torch.tensor([t for f in encoded for t in f["ids"][f["span"][0]:f["span"][1]]],
                       device=models.input_device(model))
    return model.get_input_embeddings()(ids).float().std().item()


def _padded(rows, width):
    out = np.full((len(rows), width), PAD, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def is_known(fact):
    return fact["top1"] == fact["answer"]


def make_pairs(model, tokenizer, facts, examples, seed, known_only=True, missing_subject="drop",
               batch_size=32, intervention="swap", noise_scale=3.0, pairing="subject"):
    """The pairs dataset (see pairs_dataset), predicting only what pairing needs: with `known_only`, facts
    are predicted in chunks (in the given order) until `examples` pairs of known facts are found; without
    it, only the chosen targets and sources are predicted. The Python API's path; the workflow predicts
    every fact once per model and dataset instead (predict_facts, pairs_from_predictions)."""
    method = named(intervention)
    encoded, n_missing = encode_facts(tokenizer, facts, missing_subject)
    encoded, n_too_long = drop_too_long(encoded, max_positions(model.config))
    choose = _known_pairs_in_chunks if known_only else _pairs_then_predictions
    candidates, pairs, no_partner, predicted = choose(model, encoded, tokenizer.pad_token_id, batch_size,
                                                      functools.partial(method.partners, pairing=pairing), examples,
                                                      seed)
    std = subject_embedding_std(model, candidates) if method.adds_noise and pairs else None
    counts = {"facts": len(facts), "dropped_subject_not_in_prompt": n_missing, "dropped_too_long": n_too_long,
              "dropped_not_known": predicted - len(candidates) if known_only else 0,
              "not_predicted": len(encoded) - predicted, "dropped_no_partner": no_partner, "pairs": len(pairs),
              "examples_requested": examples,
              "pairs_differing_outside_subject": pairs_differing_outside_subject(candidates, pairs)}
    return pairs_dataset(candidates, pairs, counts, seed, known_only, intervention, noise_scale, std, pairing)


def _known_pairs_in_chunks(model, encoded, pad_id, batch_size, partners, examples, seed):
    """Predict facts in chunks (doubling) until the known ones give `examples` pairs, or all are predicted."""
    chunk, predicted = max(batch_size, 2 * examples), 0
    while True:
        baseline_predictions(model, encoded[predicted:predicted + chunk], pad_id, batch_size)
        predicted = min(predicted + chunk, len(encoded))
        known = [f for f in encoded[:predicted] if is_known(f)]
        pairs, no_partner = partners(known, examples, seed)
        if len(pairs) == examples or predicted == len(encoded):
            return known, pairs, no_partner, predicted
        chunk *= 2


def _pairs_then_predictions(model, encoded, pad_id, batch_size, partners, examples, seed):
    """Pair every fact, then predict only the chosen targets and sources (their baselines)."""
    pairs, no_partner = partners(encoded, examples, seed)
    used = sorted({i for pair in pairs for i in pair})
    baseline_predictions(model, [encoded[i] for i in used], pad_id, batch_size)
    return encoded, pairs, no_partner, len(used)


def pairs_from_predictions(tokenizer, facts, predictions, examples, seed, known_only=True,
                           missing_subject="drop", intervention="swap", noise_scale=3.0, pairing="subject"):
    """The pairs dataset from the tokenizer and a predictions dataset (predict_facts) of every fact:
    no model needed. The workflow's path."""
    method = named(intervention)
    encoded, n_missing = encode_facts(tokenizer, facts, missing_subject)
    encoded, n_too_long = drop_too_long(encoded, int(predictions.attrs.get("max_positions", 0)) or None)
    attach_predictions(encoded, predictions)
    candidates = [f for f in encoded if is_known(f)] if known_only else encoded
    pairs, no_partner = method.partners(candidates, examples, seed, pairing)
    std = std_from_moments(candidates) if method.adds_noise and pairs else None
    counts = {"facts": len(facts), "dropped_subject_not_in_prompt": n_missing, "dropped_too_long": n_too_long,
              "dropped_not_known": len(encoded) - len(candidates), "not_predicted": 0,
              "dropped_no_partner": no_partner, "pairs": len(pairs), "examples_requested": examples,
              "pairs_differing_outside_subject": pairs_differing_outside_subject(candidates, pairs)}
    return pairs_dataset(candidates, pairs, counts, seed, known_only, intervention, noise_scale, std, pairing)


def pairs_dataset(known, pairs, counts, seed, known_only, intervention, noise_scale, subject_std, pairing="subject"):
    """The pairs dataset: tokenised targets and sources, subject spans, answers, baselines, counts.

    `swap`: the source is another fact (see interventions.swap_partners). `noise`: the source is the clean prompt and
    the target the same prompt with Gaussian noise of `noise_scale` times the subject embeddings' std
    (`subject_std`, over the candidate facts) added to its subject embeddings (the noise itself is drawn
    from per-example seeds stored here)."""
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
    ds.attrs.update({"intervention": intervention, "seed": seed, "known_only": int(known_only),
                     "token_padding": PAD})
    method = named(intervention)
    if method.uses_pairing:
        ds.attrs["pairing"] = pairing
    if method.adds_noise:
        ds["noise_seed"] = (ex, np.random.default_rng(seed).integers(2**62, size=len(pairs)),
                            {"description": "seed of the Gaussian noise added to this target's subject embeddings"})
        ds.attrs.update({"noise_scale": float(noise_scale), "subject_embedding_std": subject_std,
                         "noise_std": float(noise_scale) * subject_std})
    ds["target_ids"].attrs["description"] = "token ids of the target prompt, padded with -1"
    ds["source_ids"].attrs["description"] = "token ids of the source prompt, padded with -1"
    ds["subject_start"].attrs["description"] = "first subject token (same in target and source)"
    ds["subject_end"].attrs["description"] = "one past the last subject token"
    return ds


def shard_bounds(n_examples, shard_size, shard):
    start = shard * shard_size
    return min(start, n_examples), min(start + shard_size, n_examples)


def token_lists(ds, variable):
    return [row[:n].tolist() for row, n in zip(ds[variable].values, ds["length"].values)]

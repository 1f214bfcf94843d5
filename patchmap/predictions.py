"""The model's own predictions on facts, before any patching: each fact's top-1 next token, the
probability of its answer, and the moments of its subject embeddings (for the noise intervention's
scale). The workflow predicts every fact once per model, dataset and dtype (results/predictions/...); the
pairs stage and the Python API read them from here."""

import numpy as np
import torch
import xarray as xr

from . import models
from .encoding import drop_too_long, encode_facts, max_positions
from .engines.hooks import last_logprobs, pad_batch
from .errors import UserError


@torch.no_grad()
def baseline_predictions(model, encoded: list, pad_id: int, batch_size: int) -> None:
    """Sets each encoded fact's "top1" (token id) and "p_answer" from its unpatched prompt."""
    device = models.input_device(model)
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        ids, mask, pos, lengths = pad_batch([f["ids"] for f in chunk], pad_id, device)
        logprobs = last_logprobs(model, ids, mask, pos, lengths, " in a baseline (unpatched) run")  # [B, V]
        answers = torch.tensor([f["answer"] for f in chunk], device=logprobs.device)
        p_answer = logprobs[torch.arange(len(chunk), device=logprobs.device), answers].exp()
        for f, top, p in zip(chunk, logprobs.argmax(-1).tolist(), p_answer.tolist()):
            f["top1"], f["p_answer"] = top, p


@torch.no_grad()
def subject_embedding_moments(model, encoded: list) -> None:
    """Sets each encoded fact's count, sum and sum of squares (float64) of its subject tokens' input
    embedding values, from which the std over any set of facts follows exactly (std_from_moments)."""
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    for f in encoded:
        ids = torch.tensor(f["ids"][f["span"][0]:f["span"][1]], device=device)
        values = embeddings(ids).double()  # [subject tokens, H]
        f["emb_count"], f["emb_sum"], f["emb_sumsq"] = values.numel(), values.sum().item(), (values ** 2).sum().item()


def std_from_moments(facts: list) -> float:
    """Standard deviation (n - 1 in the denominator, as torch.std) of the subject embedding values of
    `facts`, from their moments."""
    n = sum(f["emb_count"] for f in facts)
    total, squares = sum(f["emb_sum"] for f in facts), sum(f["emb_sumsq"] for f in facts)
    return float(np.sqrt(max(squares - total * total / n, 0.0) / (n - 1)))


@torch.no_grad()
def subject_embedding_std(model, encoded: list) -> float:
    """Standard deviation of the input embeddings of every subject token in the facts (ROME's scale)."""
    ids = torch.tensor([t for f in encoded for t in f["ids"][f["span"][0]:f["span"][1]]],
                       device=models.input_device(model))
    return model.get_input_embeddings()(ids).float().std().item()


def is_known(fact: dict) -> bool:
    """Whether the model's greedy next token is the fact's answer."""
    return fact["top1"] == fact["answer"]


def predict_facts(model, tokenizer, facts: list, batch_size: int) -> xr.Dataset:
    """Each fact's answer token, the model's top-1 token and the answer's probability after the prompt,
    and the moments of its subject embeddings, by fact id. Facts whose subject is not in the prompt, or
    whose prompt is too long, get no prediction (pairing drops or refuses them)."""
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


def attach_predictions(encoded: list, predictions: xr.Dataset) -> None:
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

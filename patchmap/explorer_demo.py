"""Made-up explorer inputs, for the tests and benchmarks/explorer_page.py: top tokens added to a run whose
engines did not store them, and a paper-sized synthetic run (divergence and pairs datasets, made without a
model). Both follow the top-token contract of patchmap.explorer (TOP_TOKENS)."""

import numpy as np
import xarray as xr

from .quantities import METRICS


def with_fake_top_tokens(ds, pairs, k=5, pool=50, seed=0):
    """A copy of a divergence dataset with made-up top tokens. Patched runs: rank 0 is whichever answer the
    patched run gives more probability (p_target_answer, p_source_answer), rank 1 the other, ranks 2 to k-1
    made-up tokens (ids above the answers', from `pool` of them) sharing what is left of the probability. The
    unpatched target: its answer with pairs.nc's target_p_answer, then made-up tokens. token_text: the
    answers' attributes, ' tok<id>' for made-up tokens."""
    pairs = pairs.sel(example=ds["example"].values)
    rng = np.random.default_rng(seed)
    target, source = pairs["target_answer"].values, pairs["source_answer"].values
    made_up = np.arange(pool) + max(target.max(), source.max()) + 1
    shape = (ds.sizes["example"], ds.sizes["site"], ds.sizes["layer"])
    p_target = ds["p_target_answer"].transpose("example", "site", "layer").values
    p_source = ds["p_source_answer"].transpose("example", "site", "layer").values
    target_first = p_target >= p_source
    ids = np.empty((*shape, k), dtype=np.int32)
    probs = np.empty((*shape, k), dtype=np.float32)
    ids[..., 0] = np.where(target_first, target[:, None, None], source[:, None, None])
    ids[..., 1] = np.where(target_first, source[:, None, None], target[:, None, None])
    probs[..., 0], probs[..., 1] = np.maximum(p_target, p_source), np.minimum(p_target, p_source)
    ids[..., 2:], probs[..., 2:] = _made_up(rng, made_up, shape, k - 2, 1 - probs[..., 0] - probs[..., 1], probs[..., 1])
    target_ids = np.empty((shape[0], k), dtype=np.int32)
    target_probs = np.empty((shape[0], k), dtype=np.float32)
    target_ids[:, 0], target_probs[:, 0] = target, pairs["target_p_answer"].values
    target_ids[:, 1:], target_probs[:, 1:] = _made_up(rng, made_up, shape[:1], k - 1, 1 - target_probs[:, 0],
                                                      target_probs[:, 0])
    texts = {int(i): f" tok{i}" for i in made_up}
    for role in ("source", "target"):  # an answer's text: its attribute
        texts.update({int(i): f" {a}" for i, a in zip(pairs[f"{role}_answer"].values, pairs[f"{role}_attribute"].values)})
    token_ids = np.array(sorted(texts), dtype=np.int64)
    out = ds.copy()
    out["top_token"] = (("example", "site", "layer", "rank"), ids)
    out["top_prob"] = (("example", "site", "layer", "rank"), probs)
    out["target_top_token"] = (("example", "rank"), target_ids)
    out["target_top_prob"] = (("example", "rank"), target_probs)
    out["token_text"] = xr.DataArray(np.array([texts[int(i)] for i in token_ids], dtype=object), dims="token_id",
                                     coords={"token_id": token_ids})
    return out


def _made_up(rng, made_up, shape, count, rest, ceiling):
    """`count` distinct made-up token ids per row and probabilities that share `rest`, each at most the one
    before it (the first at most `ceiling`)."""
    start = rng.integers(len(made_up), size=shape)
    ids = made_up[(start[..., None] + np.arange(count)) % len(made_up)]
    probs = np.empty((*shape, count), dtype=np.float32)
    previous = ceiling
    for r in range(count):
        previous = np.minimum(previous, np.clip(rest, 0, 1) / 2 ** (r + 1)).astype(np.float32)
        probs[..., r] = previous
    return ids, probs


RELATIONS = {"P17": "{} is located in the country of", "P27": "{} is a citizen of", "P103": "The mother tongue of {} is",
             "P176": "{} is produced by", "P413": "{} plays in the position of", "P937": "{} worked in the city of",
             "P136": "{} plays music of the genre", "P364": "The original language of {} is"}
SYLLABLES = ["ka", "lo", "mi", "ran", "tes", "vo", "da", "qui", "ber", "nor", "sal", "fen", "gu", "hart", "el", "mon"]


def paper_sized_run(examples=1209, sites=("Subj.", "Attn.", "Last."), layers=32, vocab=32000, seed=0):
    """(divergence, pairs): a made-up swap run the size of config/paper.yaml's (1,209 examples x 3 sites x
    32 layers by default), with known_1000-like prompts, the paper figure's three stages in its JS (plus noise
    at full float32 precision), the other metrics from it, and top tokens from a `vocab`-sized vocabulary."""
    rng = np.random.default_rng(seed)
    word = lambda: "".join(rng.choice(SYLLABLES, size=rng.integers(2, 4))).capitalize()  # noqa: E731
    relation = rng.choice(sorted(RELATIONS), size=examples)
    subjects = [f"{word()} {word()}" for _ in range(2 * examples)]
    attributes = [word() for _ in range(200)]
    answer = rng.integers(len(attributes), size=(2, examples))
    answer[1] = np.where(answer[1] == answer[0], (answer[0] + 1) % len(attributes), answer[1])
    prompts = [[RELATIONS[r].format(subjects[e + i * examples]) for e, r in enumerate(relation)] for i in range(2)]
    depth = np.linspace(0, 1, layers)
    stages = np.stack([1 / (1 + np.exp((depth - 0.45) * 14)), np.exp(-((depth - 0.5) / 0.15) ** 2) * 0.5,
                       1 / (1 + np.exp(-(depth - 0.6) * 12))])[: len(sites)]
    js = np.clip(stages[None] + rng.normal(0, 0.12, (examples, len(sites), layers)), 0, 1).astype(np.float32)
    p_source = (js * rng.uniform(0.5, 1, js.shape)).astype(np.float32)
    p_target = ((1 - js) * rng.uniform(0.3, 1, js.shape)).astype(np.float32)
    metrics = {"js": js, "kl_patched_target": (js * rng.gamma(4, 3, js.shape)).astype(np.float32),
               "kl_target_patched": (js * rng.gamma(4, 3, js.shape)).astype(np.float32),
               "p_target_answer": p_target, "p_source_answer": p_source, "flip": (p_source > p_target).astype(np.int8)}
    dims = ("example", "site", "layer")
    ds = xr.Dataset({name: (dims, values, {"units": "bits" if name.startswith(("js", "kl")) else "probability"})
                     for name, values in metrics.items()})
    ds["flip"].attrs["units"] = "1"
    for name in METRICS:
        ds[f"{name}_mean"] = ds[name].astype("float64").mean("example")
    half = 1.96 * ds["js"].astype("float64").std("example", ddof=1) / np.sqrt(examples)
    ds["js_ci_low"], ds["js_ci_high"] = ds["js_mean"] - half, ds["js_mean"] + half
    ids = [f"known-{i}" for i in range(examples)]
    text = {"target_prompt": prompts[0], "source_prompt": prompts[1], "relation": relation,
            "target_attribute": [attributes[a] for a in answer[0]], "source_attribute": [attributes[a] for a in answer[1]]}
    ds = ds.assign_coords(example=ids, site=list(sites), layer=np.arange(layers),
                          component=("site", ["resid", "attn", "resid"][: len(sites)]),
                          positions=("site", ["subject", "last", "last"][: len(sites)]),
                          **{k: ("example", np.array(v, dtype=object)) for k, v in text.items()})
    ds.attrs.update(run="paper-sized", model="made-up", intervention="swap", window=1, ablation_value="",
                    dataset="made-up known_1000", js_base="2")
    pairs = xr.Dataset({**{k: ("example", np.array(v, dtype=object)) for k, v in text.items() if k != "relation"},
                        "target_subject": ("example", np.array(subjects[:examples], dtype=object)),
                        "source_subject": ("example", np.array(subjects[examples:], dtype=object)),
                        "target_answer": ("example", answer[0]), "source_answer": ("example", answer[1]),
                        "target_p_answer": ("example", rng.uniform(0.2, 1, examples).astype(np.float32))},
                       coords={"example": ids})
    return with_fake_top_tokens(ds, pairs, pool=vocab - len(attributes), seed=seed), pairs

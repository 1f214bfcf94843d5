"""The interventions, one class each (as pyvene's intervention classes), each built from a run's settings
with its own parameters (`from_run`). An intervention says:

- `partners(encoded, examples, seed)`: which fact is each target's source;
- `sources(pairs, extract, pooled)`: the source activations a patch job writes in, or None;
- `strategy`: what a patched run does at the site, the one thing the engines call: a write strategy puts
  `write(base, source)` in place of the site's activation (base: the activation there, source: the
  source's), a block strategy blocks the last position's attention to the site's positions;
- `target_noise(...)`: what is added to the target's input embeddings (noise), and `samples`: in how many
  noised copies each target runs (their next-token distributions are averaged before the metrics);
- `same_until(...)`: per example, the first position where the target's and the source's runs may
  differ, or None where the written value is no run's activation (the fast engine's span rule: before
  it, the source's keys and values are the target's);
- `site_problem(name, positions)`: why a site cannot be patched, if it cannot;
- `pooled`: whether its sources are pooled over every example of the run first (the workflow's extract
  and ablation stages), and `extracts_in_patch_job`: whether a shard's patch job extracts its own.

swap: the source is another fact's prompt (see PAIRINGS); its activation is written in. noise (ROME's
causal tracing): the target's subject embeddings get Gaussian noise and the clean prompt's activation is
written back. ablate: the value written is zero or the mean over the run's examples. knockout (Geva et al.
2023): nothing is written; the last position's attention to the site's positions is blocked.
Plain Python at import (the workflow's config checks use it); torch only where a method needs it.
"""

from collections import defaultdict

import numpy as np

from .errors import UserError


def outside_subject(fact):
    """The fact's tokens before and after its subject span, and the span's length: two prompts with the
    same key differ in the subject's tokens at most."""
    start, end = fact["span"]
    return tuple(fact["ids"][:start]), tuple(fact["ids"][end:]), end - start


def same_relation_and_shape(fact):
    """Same relation, token length and subject span: positions line up, but the template (e.g. the
    filler between subject and relation words) may differ."""
    return fact["relation"], len(fact["ids"]), fact["span"]


# swap pairing: `subject` (default) keeps every token outside the subject; `relation` is the looser one.
PAIRINGS = {"subject": outside_subject, "relation": same_relation_and_shape}


def swap_partners(encoded, examples, seed, pairing="subject"):
    """Pair targets with sources that share the pairing's key (see PAIRINGS) and have another answer
    token: positions then line up one to one. Deterministic given the seed. Returns (pairs, no_partner)."""
    if pairing not in PAIRINGS:
        raise UserError(f"unknown pairing '{pairing}'; available: {', '.join(PAIRINGS)}")
    key = PAIRINGS[pairing]
    rng = np.random.default_rng(seed)
    groups = defaultdict(list)
    for i, f in enumerate(encoded):
        groups[key(f)].append(i)
    pairs, no_partner = [], 0
    for i in rng.permutation(len(encoded)):
        f = encoded[i]
        candidates = [j for j in groups[key(f)] if encoded[j]["answer"] != f["answer"]]
        if not candidates:
            no_partner += 1
            continue
        pairs.append((int(i), int(candidates[rng.integers(len(candidates))])))
        if len(pairs) == examples:
            break
    return pairs, no_partner


def self_partners(encoded, examples, seed):
    """Each fact is its own source; a seeded choice of facts. Returns (pairs, no_partner = 0)."""
    order = np.random.default_rng(seed).permutation(len(encoded))[:examples]
    return [(int(i), int(i)) for i in order], 0


def first_difference(targets, sources):
    """Per example, the first position at which the target's and the source's tokens differ."""
    out = []
    for t, s in zip(targets, sources):
        n = min(len(t), len(s))
        out.append(next((i for i in range(n) if t[i] != s[i]), n))
    return out


class Intervention:
    """The defaults: the fact is its own source, whose activation is written in; nothing else changes."""
    name = ""
    pooled = False       # its source activations are pooled over every example of the run (the ablation stage)
    adds_noise = False   # the target's subject embeddings get noise (pairs.nc holds its seeds and scale)
    samples = 1          # copies of each target run, their next-token distributions averaged (noise samples)

    @property
    def extracts_in_patch_job(self):
        """Whether a shard's patch job extracts the source activations it writes in itself (the workflow's
        plan, made without torch: not from the strategy)."""
        return not self.pooled

    @property
    def strategy(self):
        """What a patched run does at the site (patchmap.engines.strategies): write `write(base, source)`."""
        from .engines.strategies import Write
        return Write(self.write)

    @classmethod
    def from_run(cls, run):
        """The intervention with the parameters a (validated) run gives it."""
        return cls()

    def write(self, base, source):
        """The site's new activation [..., H] from its activation in the target run (`base`) and the
        source's (`source`, same shape): the source's, by default."""
        return source

    def partners(self, encoded, examples, seed):
        """The (target, source) indices into `encoded` and the number of facts without a partner."""
        return self_partners(encoded, examples, seed)

    def sources(self, pairs, extract, pooled=None):
        """The source activations a job on `pairs` writes in (patchmap.activations' dataset), from
        `extract()`, which extracts the source prompts' activations, or from `pooled` values; None for
        none."""
        return extract()

    def target_noise(self, pairs, a, b, width, hidden):
        """[B x samples, T, H] added to the input embeddings of the targets a..b in every run (copy k of
        example e in row e x samples + k), or None."""
        return None

    def same_until(self, pairs, targets, sources):
        """Per example, the first position where the target's and the source's runs may differ; None where
        the written value is no run's activation (no source prefix to share)."""
        return None

    def site_problem(self, site_name, positions, component=None):
        """Why the site (its name, position group and component) cannot be patched (one line), or None."""
        return None

    def pairs_fields(self, seed, n_pairs, subject_std):
        """(variables, attributes) that pairs.nc records for this intervention; `subject_std()` is the std
        of the candidate facts' subject embeddings."""
        return {}, {}

    def recorded_settings(self):
        """The settings that result files record: the ablation value and the noise scale, if it has them."""
        return {"ablation_value": "", "noise_scale": 0.0}


class Swap(Intervention):
    name = "swap"

    def __init__(self, pairing="subject"):
        self.pairing = pairing

    @classmethod
    def from_run(cls, run):
        return cls(run["pairing"])

    def partners(self, encoded, examples, seed):
        return swap_partners(encoded, examples, seed, self.pairing)

    def same_until(self, pairs, targets, sources):
        return first_difference(targets, sources)

    def pairs_fields(self, seed, n_pairs, subject_std):
        return {}, {"pairing": self.pairing}


class Noise(Intervention):
    name = "noise"
    adds_noise = True

    def __init__(self, noise_scale=3.0, samples=1):
        self.noise_scale = noise_scale
        self.samples = samples

    @classmethod
    def from_run(cls, run):
        return cls(run["noise_scale"], run["noise_samples"])

    def target_noise(self, pairs, a, b, width, hidden):
        """Gaussian noise at the subject positions of examples a..b, `samples` copies each: copy k is the
        (k + 1)-th draw from the generator of the example's seed in pairs.nc (copy 0: the one-sample noise)."""
        import torch
        noise, std = torch.zeros(b - a, self.samples, width, hidden), pairs.attrs["noise_std"]
        for i in range(a, b):
            start, end = int(pairs["subject_start"].values[i]), int(pairs["subject_end"].values[i])
            generator = torch.Generator().manual_seed(int(pairs["noise_seed"].values[i]))
            for k in range(self.samples):
                noise[i - a, k, start:end] = torch.randn(end - start, hidden, generator=generator) * std
        return noise.view(-1, width, hidden).to(torch.float32)

    def same_until(self, pairs, targets, sources):
        """The clean source and the noised target differ from the first subject token on."""
        return [min(o, int(start)) for o, start in zip(first_difference(targets, sources),
                                                       pairs["subject_start"].values)]

    def pairs_fields(self, seed, n_pairs, subject_std):
        seeds = (("example",), np.random.default_rng(seed).integers(2**62, size=n_pairs),
                 {"description": "seed of the Gaussian noise added to this target's subject embeddings"})
        std = subject_std()
        return {"noise_seed": seeds}, {"noise_scale": float(self.noise_scale), "subject_embedding_std": std,
                                       "noise_std": float(self.noise_scale) * std}

    def recorded_settings(self):
        return {"ablation_value": "", "noise_scale": self.noise_scale, "noise_samples": self.samples}


class Ablate(Intervention):
    name = "ablate"
    pooled = True

    def __init__(self, value="mean"):
        self.value = value

    @classmethod
    def from_run(cls, run):
        return cls(run["value"])

    def pool(self, activation_datasets):
        """The values written in: zero, or the mean over every example of the extracted shards."""
        from .ablation import ablation_values
        return ablation_values(activation_datasets, self.value)

    def sources(self, pairs, extract, pooled=None):
        from .ablation import broadcast_ablation
        return broadcast_ablation(self.pool([extract()]) if pooled is None else pooled, pairs)

    def recorded_settings(self):
        return {"ablation_value": self.value, "noise_scale": 0.0}


class Knockout(Intervention):
    name = "knockout"
    extracts_in_patch_job = False  # it writes nothing in

    @property
    def strategy(self):
        from .engines.strategies import Block
        return Block()

    def sources(self, pairs, extract, pooled=None):
        return None

    def site_problem(self, site_name, positions, component=None):
        if positions == "all":  # the only group that holds the last token's every key
            return (f"knockout at site '{site_name}' (positions 'all') would block every token the last one "
                    "attends to, which leaves its attention undefined; use a group that keeps some, "
                    "e.g. non_subject")
        if component == "head":
            return (f"knockout at site '{site_name}' (component head) would block one head's edges, which "
                    "patchmap does not do; use component attn (every head's edges)")
        return None


INTERVENTIONS = {method.name: method for method in (Swap, Noise, Ablate, Knockout)}


def from_run(run):
    """The intervention of a validated run (a config's, or the Python API's arguments), with its
    parameters; a patchmap error naming the available ones for an unknown name."""
    if run["intervention"] not in INTERVENTIONS:
        raise UserError(f"unknown intervention '{run['intervention']}'; available: {', '.join(INTERVENTIONS)}")
    return INTERVENTIONS[run["intervention"]].from_run(run)

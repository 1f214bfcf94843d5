"""The interventions, one object each (as pyvene's intervention classes), all with the same questions:

- `partners(encoded, examples, seed, pairing)`: which fact is each target's source;
- `writes_sources`: whether a patched run writes a source activation in (all but knockout), and `pooled`:
  whether that value is pooled over every example of the run first (ablate: extracted in jobs of its own,
  averaged by the ablation stage); `extracts_in_patch_job` follows from the two;
- `target_noise(...)`: what is added to the target's input embeddings (noise);
- `same_until(...)`: the first position where the target's and the source's runs may differ, or None where
  the source is no run at all (the fast engine's span rule: before it, the source's keys and values are
  the target's);
- `site_problem(name, positions)`: why a site cannot be patched, if it cannot.

swap: the source is another fact's prompt (see PAIRINGS); its activation is written in. noise (ROME's
causal tracing): the target's subject embeddings get Gaussian noise and the clean prompt's activation is
written back. ablate: the value written is zero or the mean over the run's examples. knockout (Geva et al.
2023): nothing is written; the last position's attention to the site's positions is blocked.
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
    """The defaults: the fact is its own source, a source activation is written in, nothing else changes."""
    name = ""
    writes_sources = True   # a patched run writes a source activation in at the site's positions
    pooled = False          # that value is pooled over every example of the run (extracted by jobs of its own)
    uses_pairing = False    # the partner choice follows the run's `pairing`
    adds_noise = False      # the target's subject embeddings get noise (pairs.nc holds its seeds and scale)

    @property
    def extracts_in_patch_job(self):
        """Whether a shard's patch job extracts the source activations it writes in itself."""
        return self.writes_sources and not self.pooled

    def partners(self, encoded, examples, seed, pairing="subject"):
        """The (target, source) indices into `encoded` and the number of facts without a partner."""
        return self_partners(encoded, examples, seed)

    def target_noise(self, pairs, a, b, width, hidden):
        """[B, T, H] added to the input embeddings of the targets a..b in every run, or None."""
        return None

    def same_until(self, pairs, targets, sources):
        """Per example, the first position where the target's and the source's runs may differ; None where
        the written value is no run's activation (no source prefix to share)."""
        return first_difference(targets, sources)

    def site_problem(self, site_name, positions):
        """Why the site cannot be patched (one line), or None."""
        return None


class Swap(Intervention):
    name = "swap"
    uses_pairing = True

    def partners(self, encoded, examples, seed, pairing="subject"):
        return swap_partners(encoded, examples, seed, pairing)


class Noise(Intervention):
    name = "noise"
    adds_noise = True

    def target_noise(self, pairs, a, b, width, hidden):
        """Gaussian noise at the subject positions of examples a..b, from each example's seed in pairs.nc."""
        import torch  # here, not at the top: the workflow's config checks import this module without torch
        noise = torch.zeros(b - a, width, hidden)
        for i in range(a, b):
            start, end = int(pairs["subject_start"].values[i]), int(pairs["subject_end"].values[i])
            generator = torch.Generator().manual_seed(int(pairs["noise_seed"].values[i]))
            noise[i - a, start:end] = torch.randn(end - start, hidden, generator=generator) * pairs.attrs["noise_std"]
        return noise.to(torch.float32)

    def same_until(self, pairs, targets, sources):
        """The clean source and the noised target differ from the first subject token on."""
        return [min(o, int(start)) for o, start in zip(first_difference(targets, sources),
                                                       pairs["subject_start"].values)]


class Ablate(Intervention):
    name = "ablate"
    pooled = True

    def same_until(self, pairs, targets, sources):
        return None  # a mean or zero per layer, not one layer's output fed to the next


class Knockout(Intervention):
    name = "knockout"
    writes_sources = False

    def same_until(self, pairs, targets, sources):
        return None

    def site_problem(self, site_name, positions):
        if positions == "all":  # the only group that holds the last token's every key
            return (f"knockout at site '{site_name}' (positions 'all') would block every token the last one "
                    "attends to, which leaves its attention undefined; use a group that keeps some, "
                    "e.g. non_subject")
        return None


INTERVENTIONS = {method.name: method for method in (Swap(), Noise(), Ablate(), Knockout())}


def named(name):
    """The intervention called `name`; a patchmap error naming the available ones otherwise."""
    if name not in INTERVENTIONS:
        raise UserError(f"unknown intervention '{name}'; available: {', '.join(INTERVENTIONS)}")
    return INTERVENTIONS[name]

"""The built-in synthetic world: multi-token subjects, four relations, biographies and question prompts.

Subjects are ordered triples of name tokens from one shared pool, and the same pool supplies filler
tokens between the subject and the relation words. Neither a subject's tokens alone nor the distance
from the last token identify it, so the model has to build the subject at its last token and carry
it to the end of the prompt in later layers: the three stages of the paper figure.

Training sequences draw fresh random fillers, but the question prompts (the dataset the runs patch)
share a few filler sequences, so that many prompts differ from one another only in their subject:
swap pairs can then keep every token outside the subject (pairs.swap_partners).
"""

from dataclasses import dataclass
from itertools import combinations, permutations

import numpy as np

NAMES = """Abel Bran Cato Dara Eno Fil Gus Hana Ivo Jola Kai Lev Mira Nils Oda Pim Quin Rhea Sol Tove
Ugo Vera Wim Xena Yuri Zoe Ada Bea Cy Dov""".split()
CITIES = """Paris Lima Oslo Cairo Quito Dakar Hanoi Kyoto Lagos Minsk Perth Porto Riga Rome Sofia Tunis
Turin Vaduz Zagreb Accra Baku Bern Doha Kabul Lhasa Lyon Malmo Nice Pune Seoul Tripoli Varna""".split()
JOBS = """baker nurse pilot farmer tailor judge miner potter sailor cook barber dentist plumber poet
painter mason weaver clerk guard vet banker chemist""".split()
SPORTS = """golf tennis rugby chess boxing rowing fencing judo polo hockey cricket squash karate surfing
archery curling diving""".split()
LANGUAGES = """Welsh Basque Finnish Greek Latvian Maltese Polish Dutch Czech Irish Danish Hindi Thai
Swahili""".split()

RELATIONS = {
    "city": ("lives in the city of", CITIES),
    "job": ("works as a", JOBS),
    "sport": ("plays the sport of", SPORTS),
    "language": ("speaks the language of", LANGUAGES),
}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]


@dataclass(frozen=True)
class World:
    subjects: list  # each a tuple of name tokens
    attributes: list  # per subject, {relation: value}
    name_pool: list
    relations: dict  # relation -> (relation words, values)
    max_filler: int
    seed: int
    filler_variants: int = 1  # filler sequences of each length that the question prompts share


def make_world(seed=0, name_pool=20, subject_sets=200, orders=3, max_filler=3,
               values_per_relation=(30, 20, 15, 12), subject_length=3, filler_variants=1):
    """Draw subjects and their facts. Everything follows from the seed."""
    rng = np.random.default_rng(seed)
    pool = list(rng.choice(NAMES, size=name_pool, replace=False))
    relations = {
        name: (words, list(rng.choice(values, size=n, replace=False)))
        for (name, (words, values)), n in zip(RELATIONS.items(), values_per_relation)
    }
    all_sets = list(combinations(pool, subject_length))
    chosen = rng.choice(len(all_sets), size=subject_sets, replace=False)
    subjects = []
    for i in chosen:
        orderings = list(permutations(all_sets[i]))
        for j in rng.choice(len(orderings), size=orders, replace=False):
            subjects.append(tuple(orderings[j]))
    attributes = [
        {rel: str(values[rng.integers(len(values))]) for rel, (_, values) in relations.items()}
        for _ in subjects
    ]
    return World(subjects, attributes, [str(n) for n in pool], relations, max_filler, seed, filler_variants)


def vocabulary(world):
    words = set(world.name_pool) | {",", "."}
    for words_, values in world.relations.values():
        words |= set(words_.split()) | set(values)
    return SPECIAL_TOKENS + sorted(words)


def _filler(world, rng):
    n = rng.integers(world.max_filler + 1)
    return list(rng.choice(world.name_pool, size=n)) if n else []


def question_prompt(world, subject, relation, filler):
    return " ".join([*subject, *filler, world.relations[relation][0]])


def shared_fillers(world, rng):
    """The filler sequences the question prompts draw from: `filler_variants` of each length
    1..max_filler (and the empty one), as lists of name tokens."""
    shared = [[]]
    for n in range(1, world.max_filler + 1):
        shared += [list(map(str, rng.choice(world.name_pool, size=n))) for _ in range(world.filler_variants)]
    return shared


def _shared_filler(world, shared, rng):
    """A filler length drawn as in training (uniform over 0..max_filler), then one shared sequence of it."""
    n = rng.integers(world.max_filler + 1)
    if n == 0:
        return shared[0]
    return shared[1 + (n - 1) * world.filler_variants + rng.integers(world.filler_variants)]


def facts(world, seed=None):
    """One question prompt per (subject, relation), with a seeded choice of shared filler; the dataset
    the runs patch."""
    rng = np.random.default_rng(world.seed + 1 if seed is None else seed)
    shared = shared_fillers(world, rng)
    rows = []
    for s, (subject, attrs) in enumerate(zip(world.subjects, world.attributes)):
        for relation in world.relations:
            rows.append({
                "id": f"s{s:03d}-{relation}",
                "subject": " ".join(subject),
                "relation": relation,
                "prompt": question_prompt(world, subject, relation, _shared_filler(world, shared, rng)),
                "attribute": attrs[relation],
            })
    return rows


def training_text(world, rng):
    """One training sequence: a question with its answer, or a biography listing all four facts."""
    s = rng.integers(len(world.subjects))
    subject, attrs = world.subjects[s], world.attributes[s]
    if rng.random() < 0.5:
        relation = list(world.relations)[rng.integers(len(world.relations))]
        return question_prompt(world, subject, relation, _filler(world, rng)) + " " + attrs[relation]
    order = rng.permutation(list(world.relations))
    clauses = [f"{world.relations[r][0]} {attrs[r]}" for r in order]
    return " ".join([*subject, *_filler(world, rng), " , ".join(clauses), "."])

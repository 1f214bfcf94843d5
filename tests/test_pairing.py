"""Swap pairing: by default the source differs from the target only in the subject's tokens; the
looser `relation` pairing (same relation, length and subject span) stays available."""

import pytest
import yaml

from patchmap import config as cfg
from patchmap import synthetic
from patchmap.errors import UserError
from patchmap.encoding import token_lists
from patchmap.schema import SCHEMA


def outside_the_subject(pairs, variable):
    """Each example's tokens before and after its subject span."""
    rows = token_lists(pairs, variable)
    return [(r[:s], r[e:]) for r, s, e in zip(rows, pairs["subject_start"].values, pairs["subject_end"].values)]


@pytest.fixture(scope="module")
def varied_world():
    """The conftest world's subjects and vocabulary, with three filler sequences of each length, so that
    prompts of one relation and length can differ outside the subject."""
    return synthetic.make_world(seed=0, name_pool=8, subject_sets=6, orders=2, filler_variants=3)


def test_default_pairs_differ_only_in_the_subject(tiny_model, pairs_for):
    pairs = pairs_for(*tiny_model, examples=20)
    assert pairs.sizes["example"] == 20
    assert outside_the_subject(pairs, "target_ids") == outside_the_subject(pairs, "source_ids")
    assert (pairs["target_answer"] != pairs["source_answer"]).all()
    assert pairs.attrs["pairing"] == "subject"
    assert pairs.attrs["count_pairs_differing_outside_subject"] == 0


def test_facts_without_such_a_partner_are_dropped_and_counted(tiny_model, varied_world, pairs_for):
    facts = synthetic.facts(varied_world)
    pairs = pairs_for(*tiny_model, examples=len(facts), facts=facts)
    assert outside_the_subject(pairs, "target_ids") == outside_the_subject(pairs, "source_ids")
    assert pairs.attrs["count_dropped_no_partner"] > 0
    assert pairs.attrs["count_pairs"] + pairs.attrs["count_dropped_no_partner"] == len(facts)


def test_the_relation_pairing_keeps_length_and_span_but_not_the_template(tiny_model, varied_world, pairs_for):
    facts = synthetic.facts(varied_world)
    pairs = pairs_for(*tiny_model, examples=len(facts), facts=facts, pairing="relation")
    targets, sources = outside_the_subject(pairs, "target_ids"), outside_the_subject(pairs, "source_ids")
    differing = sum(t != s for t, s in zip(targets, sources))
    assert differing > 0
    assert pairs.attrs["count_pairs_differing_outside_subject"] == differing
    assert pairs.attrs["pairing"] == "relation"
    by_id = {f["id"]: f for f in facts}
    assert all(by_id[t]["relation"] == by_id[s]["relation"]
               for t, s in zip(pairs["target_id"].values, pairs["source_id"].values))
    assert token_lists(pairs, "target_ids") != token_lists(pairs, "source_ids")
    assert [len(r) for r in token_lists(pairs, "target_ids")] == [len(r) for r in token_lists(pairs, "source_ids")]


def test_an_unknown_pairing_is_a_user_error(tiny_model, pairs_for):
    with pytest.raises(UserError, match="unknown pairing 'template'; available: subject, relation"):
        pairs_for(*tiny_model, examples=4, pairing="template")


def test_the_config_defaults_to_subject_pairing_and_checks_the_value():
    config = yaml.safe_load((SCHEMA.parent / "config.yaml").read_text())
    assert cfg.validate(config)["runs"]["default"]["pairing"] == "subject"
    config["runs"]["default"]["pairing"] = "template"
    with pytest.raises(UserError, match="runs.default.pairing: 'template' is not one of"):
        cfg.validate(config)

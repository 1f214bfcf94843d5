import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr

from patchmap.metrics import (ROWS, Targets, equal_slices, js_divergence, kl_divergence, patch_metrics, pieces,
                              top_k)


def random_logprobs(n, vocab, seed, sharpness=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * sharpness, -1).float()


@pytest.mark.parametrize("sharpness", [1.0, 8.0, 30.0])  # 30: many probabilities near zero
def test_js_matches_scipy(sharpness):
    logp, logq = random_logprobs(16, 500, 1, sharpness), random_logprobs(16, 500, 2, sharpness)
    ours = js_divergence(logp, logq, base=2).numpy()
    p, q = logp.double().exp().numpy(), logq.double().exp().numpy()
    theirs = np.array([jensenshannon(a, b, base=2) ** 2 for a, b in zip(p, q)])
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_js_base_e_matches_scipy():
    logp, logq = random_logprobs(4, 50, 3), random_logprobs(4, 50, 4)
    theirs = np.array([jensenshannon(a, b) ** 2 for a, b in zip(logp.double().exp().numpy(), logq.double().exp().numpy())])
    np.testing.assert_allclose(js_divergence(logp, logq, base=np.e).numpy(), theirs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("sharpness", [1.0, 20.0])
def test_kl_matches_scipy(sharpness):
    logp, logq = random_logprobs(8, 300, 5, sharpness), random_logprobs(8, 300, 6, sharpness)
    p, q = logp.double().exp().numpy(), logq.double().exp().numpy()
    theirs = rel_entr(p, q).sum(-1) / np.log(2)
    np.testing.assert_allclose(kl_divergence(logp, logq).numpy(), theirs, rtol=1e-4, atol=1e-5)


def test_js_identical_is_zero_symmetric_and_bounded():
    logp, logq = random_logprobs(32, 100, 7, 5.0), random_logprobs(32, 100, 8, 5.0)
    assert torch.all(js_divergence(logp, logp) == 0)
    torch.testing.assert_close(js_divergence(logp, logq), js_divergence(logq, logp))
    disjoint_p = torch.log(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    disjoint_q = torch.log(torch.tensor([[0.0, 0.0, 0.5, 0.5]]))
    assert js_divergence(disjoint_p, disjoint_q).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(js_divergence(logp, logq) <= 1.0)


def test_zero_probabilities_give_finite_values():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    logq = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    js = js_divergence(logp, logq)
    assert torch.isfinite(js).all()
    assert js.item() == pytest.approx(jensenshannon([0.5, 0.5, 0], [0.25, 0.25, 0.5], base=2) ** 2, abs=1e-6)


def test_patch_metrics_reads_answers_and_flip():
    target = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    patched = torch.log(torch.tensor([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]))
    m = patch_metrics(patched, Targets(target), torch.tensor([0, 0]), target_answer=torch.tensor([0, 0]),
                      source_answer=torch.tensor([1, 1]))
    torch.testing.assert_close(m["p_target_answer"], torch.tensor([0.1, 0.6]))
    torch.testing.assert_close(m["p_source_answer"], torch.tensor([0.8, 0.3]))
    assert m["flip"].tolist() == [1, 0]


@pytest.mark.parametrize("sharpness", [1.0, 10.0, 40.0])
def test_patch_metrics_match_float64_over_a_large_vocabulary(sharpness):
    """Runs (more than one piece of ROWS) against a table of targets they index into, over a vocabulary of
    32,000, as the engines use it: every divergence as float64 computes it, within the engines' tolerances."""
    targets = random_logprobs(5, 32_000, 11, sharpness)
    rows = torch.arange(2 * ROWS + 3) % 5
    patched = torch.cat([random_logprobs(len(rows) - 4, 32_000, 12, sharpness), targets[rows[-4:]]])  # 4 unpatched
    answers = torch.randint(0, 32_000, (2, len(rows)), generator=torch.Generator().manual_seed(0))
    m = patch_metrics(patched, Targets(targets), rows, answers[0], answers[1])
    p, t = patched.double().exp().numpy(), targets[rows].double().exp().numpy()
    js = np.array([jensenshannon(a, b, base=2) ** 2 for a, b in zip(p, t)])
    np.testing.assert_allclose(m["js"].numpy(), js, atol=1e-5)
    np.testing.assert_allclose(m["kl_patched_target"].numpy(), rel_entr(p, t).sum(-1) / np.log(2), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(m["kl_target_patched"].numpy(), rel_entr(t, p).sum(-1) / np.log(2), atol=1e-5, rtol=1e-5)
    for k in ("js", "kl_patched_target", "kl_target_patched"):
        assert (m[k][-4:] == 0).all(), k  # a run equal to its target: exactly 0
    np.testing.assert_allclose(m["p_source_answer"].numpy(), p[np.arange(len(rows)), answers[1].numpy()], rtol=1e-5,
                               atol=1e-7)


def test_logits_become_log_probs_in_place_piece_by_piece():
    targets = random_logprobs(3, 1000, 13)
    logits = torch.randn(2 * ROWS + 5, 1000, generator=torch.Generator().manual_seed(1)) * 4
    rows, answers = torch.arange(len(logits)) % 3, torch.zeros(len(logits), dtype=torch.long)
    from_logprobs = patch_metrics(torch.log_softmax(logits, -1), Targets(targets), rows, answers, answers)
    from_logits = patch_metrics(logits.clone(), Targets(targets), rows, answers, answers, logits=True)
    for k, v in from_logprobs.items():
        torch.testing.assert_close(from_logits[k], v, rtol=1e-5, atol=1e-6)


def test_runs_of_one_target_side_by_side_compare_as_runs_in_any_order():
    """Runs sorted by target (pieces read the target row in place) get exactly the metrics they get mixed
    with other targets' runs (pieces copy each run's target row)."""
    targets = random_logprobs(4, 2000, 21, 5.0)
    rows = torch.arange(4).repeat_interleave(ROWS + 3)  # side by side, each target's runs over a piece
    patched = random_logprobs(len(rows), 2000, 22, 5.0)
    answers = torch.randint(0, 2000, (2, len(rows)), generator=torch.Generator().manual_seed(3))
    mixed = torch.randperm(len(rows), generator=torch.Generator().manual_seed(4))
    side_by_side = patch_metrics(patched, Targets(targets), rows, answers[0], answers[1])
    shuffled = patch_metrics(patched[mixed], Targets(targets), rows[mixed], answers[0][mixed], answers[1][mixed])
    assert len(pieces(rows)) == 8 and all(target is not None for _, target in pieces(rows))
    assert all(target is None for _, target in pieces(rows[mixed]))
    for k, v in side_by_side.items():
        assert torch.equal(v[mixed], shuffled[k]), k


def test_no_runs_get_no_metrics():
    targets = Targets(random_logprobs(2, 1000, 5))
    none = torch.zeros(0, dtype=torch.long)
    for logits in (False, True):
        metrics = patch_metrics(torch.zeros(0, 1000), targets, none, none, none, logits=logits)
        assert metrics and all(len(v) == 0 for v in metrics.values())


@pytest.mark.parametrize("runs", [1, ROWS, ROWS + 1, 2 * ROWS + 3, 35, 100])
def test_a_stretch_of_runs_is_cut_into_the_fewest_equal_pieces(runs):
    assert equal_slices(7, 7) == []
    parts = equal_slices(7, 7 + runs)
    sizes = [part.stop - part.start for part in parts]
    assert parts[0].start == 7 and parts[-1].stop == 7 + runs
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    assert len(parts) == -(-runs // ROWS) and max(sizes) <= ROWS and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the largest first: the workspace made for it holds the rest


@pytest.mark.parametrize("vocab", [115, 1000, 32000, 50257])
def test_top_k_gives_the_k_largest_of_every_row_as_topk(vocab):
    """metrics.top_k (a first pass over blocks of columns) finds the values topk finds, at their indices,
    also where the largest lie after the last whole block, and where values are equal."""
    generator = torch.Generator().manual_seed(vocab)
    values = torch.randn(9, vocab, generator=generator)
    values[1, -3:] += 10.0  # the largest after the last whole block
    values[2, 64:80] = 7.0  # more equal largest values than k
    values = torch.cat([values, torch.zeros(1, vocab)])
    top, where = top_k(values, 5)
    expected, _ = values.topk(5, dim=-1)
    assert torch.equal(top, expected)
    assert torch.equal(values.gather(1, where), top)
    assert all(len(set(row)) == 5 for row in where.tolist())  # no column twice

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr

from patchmap.metrics import js_divergence, kl_divergence, patch_metrics


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
    target = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]]))
    patched = torch.log(torch.tensor([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]))
    m = patch_metrics(patched, target, target_answer=torch.tensor([0, 0]), source_answer=torch.tensor([1, 1]))
    torch.testing.assert_close(m["p_target_answer"], torch.tensor([0.1, 0.6]))
    torch.testing.assert_close(m["p_source_answer"], torch.tensor([0.8, 0.3]))
    assert m["flip"].tolist() == [1, 0]

"""How closely two computations of the same metrics must agree, per metric, and a record of how closely
they did (printed at the end of the test run, see conftest.pytest_terminal_summary).

The engines differ only in float32 rounding (other matrix shapes, kernels and thread counts). Bounded
quantities (JS in [0, 1] bits, probabilities) get an absolute 1e-5. KL is unbounded and sums
p * (log p - log q): a log-probability near -30 carries float32 rounding of ~30 * 1.2e-7 per term, so its
error grows with its size and it gets 1e-5 relative on top of the absolute 1e-5. flip (0/1) must match.
"""

import numpy as np

TOLERANCES = {  # metric: (absolute, relative)
    "js": (1e-5, 0.0),
    "p_target_answer": (1e-5, 0.0),
    "p_source_answer": (1e-5, 0.0),
    "kl_patched_target": (1e-5, 1e-5),
    "kl_target_patched": (1e-5, 1e-5),
    "flip": (0.0, 0.0),
}
LOGPROB_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # log-probabilities: log-scale, like KL

largest = {}  # metric: [largest |difference|, largest |difference| / tolerance], over the whole test run


def merge_largest(other):
    """Take in another process's record (a pytest-xdist worker's, see conftest)."""
    for metric, (difference, share) in other.items():
        seen = largest.setdefault(metric, [0.0, 0.0])
        seen[0], seen[1] = max(seen[0], difference), max(seen[1], share)


def assert_metric_close(metric, got, expected, where=""):
    """Assert two arrays of `metric` agree within its tolerance; record the largest difference seen."""
    atol, rtol = TOLERANCES[metric]
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    difference = np.abs(got - expected)
    allowed = atol + rtol * np.abs(expected)
    if difference.size:
        seen = largest.setdefault(metric, [0.0, 0.0])
        seen[0] = max(seen[0], float(difference.max()))
        share = np.divide(difference, allowed, out=np.where(difference > 0, np.inf, 0.0), where=allowed > 0)
        seen[1] = max(seen[1], float(share.max()))
    assert (difference <= allowed).all(), (where, metric, float(difference.max()),
                                           f"allowed {atol} + {rtol} * |value|")


def assert_datasets_close(reference, got):
    """Per-site datasets of metrics [example, layer] (patchmap.patching.run_patch_job's result) agree metric by
    metric, and name the same top tokens."""
    for name, ref in reference.items():
        for metric in TOLERANCES:
            assert got[name][metric].dtype == ref[metric].dtype, (name, metric)
            assert_metric_close(metric, got[name][metric].values, ref[metric].values, name)
        for tokens, probs in (("top_token", "top_prob"), ("target_top_token", "target_top_prob")):
            if tokens in ref:
                assert_top_tokens_agree(got[name][tokens].values, got[name][probs].values, ref[tokens].values,
                                        ref[probs].values, name)


def assert_top_tokens_agree(tokens, probs, expected_tokens, expected_probs, where=""):
    """The same top tokens [..., rank] with probabilities within p_target_answer's tolerance; where two
    ranks' probabilities tie within it, either order (or, at the last rank, either token) counts."""
    atol = TOLERANCES["p_target_answer"][0]
    assert np.abs(probs - expected_probs).max(initial=0) <= atol, (where, "top probabilities")
    tied = np.zeros(tokens.shape, dtype=bool)
    close = np.abs(np.diff(expected_probs, axis=-1)) <= 2 * atol
    tied[..., :-1] |= close
    tied[..., 1:] |= close
    tied[..., -1] |= np.abs(expected_probs[..., -1] - probs[..., -1]) <= 2 * atol  # a rival just below the last
    assert ((tokens == expected_tokens) | tied).all(), (where, "top tokens")

"""What each per-example metric in a result file means, and its unit. Plain data, without torch: the
jobs that merge and plot results read it; patchmap.metrics computes the metrics."""

DESCRIPTIONS = {
    "js": "Jensen-Shannon divergence between the patched and the unpatched target distribution",
    "kl_patched_target": "KL(P_patched || P_target)",
    "kl_target_patched": "KL(P_target || P_patched)",
    "p_target_answer": "probability of the target's answer token under the patched run",
    "p_source_answer": "probability of the source's answer token under the patched run",
    "flip": "1 if the patched run's top-1 token is the source's answer token, else 0",
}
METRICS = tuple(DESCRIPTIONS)  # the per-example metrics, in the order result files hold them

TOP_K = 5  # the patched and the unpatched runs' most probable next tokens that result files keep
TOP_DESCRIPTIONS = {
    "top_token": f"the patched run's {TOP_K} most probable next tokens (token ids; token_text decodes them), "
                 "most probable first",
    "top_prob": "their probabilities under the patched run",
    "target_top_token": f"the unpatched target run's {TOP_K} most probable next tokens (token ids), most "
                        "probable first",
    "target_top_prob": "their probabilities under the unpatched target run",
}
TARGET_TOP = ("target_top_token", "target_top_prob")  # per example: the same for every site

IN_LOG_BASE = "the run's log base"  # a divergence: in bits for js_base 2, in nats for e
UNITS = {"js": IN_LOG_BASE, "kl_patched_target": IN_LOG_BASE, "kl_target_patched": IN_LOG_BASE,
         "p_target_answer": "probability", "p_source_answer": "probability", "flip": "1",
         "top_prob": "probability", "target_top_prob": "probability"}


def log_unit(js_base) -> str:
    """The unit of a divergence computed with logarithms to `js_base` (2 or e)."""
    return "bits" if js_base == 2 else "nats"


def unit(metric: str, js_base) -> str:
    """The unit of `metric` in a run whose divergences use logarithms to `js_base`."""
    return log_unit(js_base) if UNITS[metric] == IN_LOG_BASE else UNITS[metric]

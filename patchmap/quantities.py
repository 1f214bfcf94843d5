"""What each per-example metric in a result file means, and its unit. Plain data, without torch: the
jobs that merge and plot results read it; patchmap.metrics computes the metrics."""

METRICS = {
    "js": "Jensen-Shannon divergence between the patched and the unpatched target distribution",
    "kl_patched_target": "KL(P_patched || P_target)",
    "kl_target_patched": "KL(P_target || P_patched)",
    "p_target_answer": "probability of the target's answer token under the patched run",
    "p_source_answer": "probability of the source's answer token under the patched run",
    "flip": "1 if the patched run's top-1 token is the source's answer token, else 0",
}

# "bits" is the run's log base: bits for js_base 2, nats for e
UNITS = {"js": "bits", "kl_patched_target": "bits", "kl_target_patched": "bits",
         "p_target_answer": "probability", "p_source_answer": "probability", "flip": "1"}

"""FLOPs of a patching job (multiply-add = 2 FLOPs), for the benchmarks: what the reference engine's full
forwards compute, and what the fast engine's schedule computed, from its counters."""

from patchmap import models


def _matrix_parameters(module):
    return sum(p.numel() for p in module.parameters() if p.dim() == 2)


def block_parameters(model):
    """(attention, MLP) weight-matrix parameters of one decoder block."""
    attention = _matrix_parameters(models.component_module(model, "attn", 0))
    entry, exit_ = models.mlp_modules(model, 0)
    mlp = _matrix_parameters(entry) + (0 if exit_ is entry else _matrix_parameters(exit_))
    return attention, mlp


def _vocabulary_and_width(model):
    weight = model.get_output_embeddings().weight
    return weight.shape[0], weight.shape[1]


def fast_flops(model, stats, clean_positions_sq):
    """The fast engine's schedule: attention projections for every position computed, the MLP where it
    ran (the last block's at the last position only), attention scores, the output embedding for each
    run and the clean runs' kept positions, and the clean runs' blocks."""
    attention, mlp = block_parameters(model)
    vocab, width = _vocabulary_and_width(model)
    layers, hidden = models.n_layers(model), model.config.hidden_size
    patched = 2 * attention * stats["block_tokens"] + 2 * mlp * stats["mlp_tokens"] \
        + 4 * hidden * stats["attention_scores"] + 2 * width * vocab * stats["head_rows"]
    clean = 2 * (attention + mlp) * layers * stats["clean_tokens"] + 4 * hidden * layers * clean_positions_sq \
        + 2 * width * vocab * stats["clean_logit_rows"]
    return patched + clean


def reference_flops(model, forwards, padded_tokens, padded_positions_sq):
    """`forwards` full forwards of the padded batches (`padded_tokens` tokens, sum of squared widths over
    prompts `padded_positions_sq`), logits at every position."""
    attention, mlp = block_parameters(model)
    vocab, width = _vocabulary_and_width(model)
    layers, hidden = models.n_layers(model), model.config.hidden_size
    per_forward = 2 * (attention + mlp) * layers * padded_tokens + 4 * hidden * layers * padded_positions_sq \
        + 2 * width * vocab * padded_tokens
    return forwards * per_forward

"""FLOPs of a patching job (multiply-add = 2 FLOPs): what the reference engine's full forwards compute, what
the fast engine's schedule computed (from its counters, FastEngine.stats), and the exact-work floor: the
least work any exact engine must do for the job. The benchmarks report their engines' FLOP rates with it."""

from .. import models


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


def _query_output_parameters(model):
    """Weight-matrix parameters of one block's attention modules that compute only where the attention
    output is read (models.attention_output_modules)."""
    return sum(_matrix_parameters(module) for module in models.attention_output_modules(model, 0))


def output_embedding_rows(stats):
    """The fast engine's output-embedding rows (FastEngine.stats): the patched runs' and the unpatched
    targets'."""
    return stats["head_rows"] + stats["target_head_rows"]


def fast_flops(model, stats, clean_positions_sq):
    """The fast engine's schedule: attention projections for every position computed (the query and output
    projections, where they are modules of their own, only where the attention output is read), the MLP
    where it ran (the last block's at the last position only), attention scores, the output embedding for
    each run, each unpatched target and the clean runs' kept positions, and the clean runs' blocks
    (attention at every position of the padded batch, the MLP where it ran)."""
    attention, mlp = block_parameters(model)
    query_output = _query_output_parameters(model)
    vocab, width = _vocabulary_and_width(model)
    layers, hidden = models.n_layers(model), model.config.hidden_size
    patched = 2 * (attention - query_output) * stats["block_tokens"] \
        + 2 * query_output * stats["query_output_tokens"] + 2 * mlp * stats["mlp_tokens"] \
        + 4 * hidden * stats["attention_scores"] + 2 * width * vocab * output_embedding_rows(stats)
    clean = 2 * (attention - query_output) * layers * stats["clean_tokens"] \
        + 2 * query_output * stats["clean_query_output_tokens"] + 2 * mlp * stats["clean_mlp_tokens"] \
        + 4 * hidden * layers * clean_positions_sq + 2 * width * vocab * stats["clean_logit_rows"]
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


def _key_value_parameters(model):
    """Weight-matrix parameters of one block's key and value projections, from the config."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.hidden_size * kv_heads * head_dim


def floor_flops(model, lengths, subject_ends):
    """The least matrix-multiply work any exact engine must do in the patch stage of the benchmarks' job
    (Subj. = resid at the subject span, Attn. = attn at the last token, Last. = resid at the last token;
    every layer; swap pairs sharing the tokens before the subject), given the source activations at the
    sites and nothing else:

    - the clean target run: every block at every position (its keys and values are the patched runs'
      prefix), except the last block's query, output projection and MLP, needed at the last position only;
      its logits at the last position;
    - Subj. at layer l: positions after the subject in blocks l + 1 .. N - 1 (the subject positions equal
      the source's there, earlier positions the clean run's); in block l + 1 their keys and values are
      still the clean ones, in the last block only the last position needs more than keys and values;
      nothing at l = N - 1 (the output is the clean one);
    - Attn. at layer l: block l's MLP at the last position (the attention output is replaced), then
      blocks l + 1 .. N - 1 there; Last. at layer l: blocks l + 1 .. N - 1 at the last position;
    - attention scores for every query computed, and the output embedding once per run.
    Per-element work (norms, softmax, the metrics over the vocabulary) is not counted, as in the other two."""
    attention, mlp = block_parameters(model)
    key_value = _key_value_parameters(model)
    query_output = attention - key_value
    vocab, width = _vocabulary_and_width(model)
    n, hidden = models.n_layers(model), model.config.hidden_size
    head = 2 * width * vocab
    full = 2 * (attention + mlp)

    def scores(keys):
        return 4 * hidden * keys

    total = 0
    for length, end in zip(lengths, subject_ends):
        length, end = int(length), int(end)
        after = length - end  # positions after the subject
        total += (n - 1) * length * full + length * 2 * key_value + 2 * (query_output + mlp) + head
        total += (n - 1) * scores(length * (length + 1) // 2) + scores(length)
        for layer in range(n):
            for block in range(layer + 1, n):
                if after <= 0:
                    break
                if block == n - 1:
                    work = 2 * key_value * after * (block != layer + 1) + 2 * (query_output + mlp)
                else:
                    work = after * (2 * (query_output + mlp) if block == layer + 1 else full)
                total += work + (scores(length) if block == n - 1 else scores(sum(range(end + 1, length + 1))))
            total += head * (2 if layer == n - 1 else 3)
            total += 2 * mlp + 2 * (n - 1 - layer) * (full + scores(length))
    return total


def job_shape(tokenizer, facts, examples, seed):
    """Prompt lengths and subject ends of the benchmarks' swap pairs, as make_pairs picks them with
    known_only false (no model needed)."""
    from ..encoding import encode_facts
    from ..interventions import swap_partners

    encoded, _ = encode_facts(tokenizer, facts)
    pairs, _ = swap_partners(encoded, examples, seed)
    targets = [encoded[i] for i, _ in pairs]
    return [len(f["ids"]) for f in targets], [f["span"][1] for f in targets]


def padded_batches(lengths, batch_size):
    """(tokens, sum of squared widths) of the prompts padded batch by batch, as the reference runs them."""
    tokens = squares = 0
    for a in range(0, len(lengths), batch_size):
        part = lengths[a:a + batch_size]
        tokens += len(part) * max(part)
        squares += len(part) * max(part) ** 2
    return tokens, squares

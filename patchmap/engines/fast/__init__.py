"""The fast patching engine: many patched runs per forward, and nothing recomputed that a patch cannot change.

For a batch of examples, the unpatched target runs once through the model's own forward. Hooks record
each decoder block's input hidden state and call arguments (masks, rotary embeddings, position ids), and
a recording cache, given under the model's own name for its cache argument, records each layer's keys and
values; each block's MLP runs only where something reads it (the prompts' positions, not the batch's
padding; in the last block, their last positions). The patched runs then never go through the
model's forward; they go through its decoder blocks, called directly, on a schedule over layers:

- a run patched at layer l joins the batch at block l (attn, mlp: with the clean block input, and a hook
  on the component writes the source activation into that run's rows) or at block l + 1 (resid: the
  block's clean output with the source activation written in), so blocks before a run's layer are
  never recomputed for it, and every run active at a block shares one call of that block; with a patch
  window, l is the window's first layer and the source is written in again at each later layer of it;
  a knockout run (the last position's attention to the site's positions blocked) computes only the last
  position, from the window's first block on, with those keys masked in the window's blocks;
- only positions from the first patched position on (the suffix) are computed: earlier positions are
  identical to the clean run, so their keys and values come from the recording as a prefix cache (for
  a resid span after a prefix the source run shares, the source's keys and values up to the span's end);
- the last block runs its MLP, and the attention's query and output projections where they are modules of
  their own, at the last position only (nothing else of it feeds the output; the keys and values of every
  position are computed), and logits are computed only there (final norm and output embedding applied to
  that position's hidden state; Gemma's final softcapping included), for every site and layer of a batch in
  a few large products, the unpatched targets' too (checked against the model's own logits at one position
  of the engine's first clean run; the model's forward computes no logits in later ones); a run that
  changes nothing at the last position (a resid patch at the last layer before the last token) computes
  nothing at all and gets its target's own metrics (runs.unchanged).

Runs are grouped by how many positions they compute, not by where they start: each row of a block call gets
its own mask (gathered from the clean run's), positions and prefix cache (padded to the longest prefix, the
padding masked). Runs of close widths share calls, padded at the end to the widest while that adds at most a
quarter of their positions (schedule.PADDING: padded positions are masked as keys and never read, and their
MLPs do not run; fewer, larger calls). Where the model's own kernels are slow for these calls, the engine's
own compute instead (kernels.py): on the CPU, a block call's attention is two batched matrix products over
every row and head (cpu_attention: the CPU flash kernel solves the calls' many small problems, a few queries
against a few dozen keys, one at a time), and the tanh GELU that transformers composes of five elementwise
operations (gelu_new: GPT-2, GPT-J, Phi) is torch's fused one, in the block calls and the clean run. Each
site's runs have calls of their own, so that a site's numbers do not depend on the other sites of its job.
Runs are chunked to a budget of (runs x suffix positions) per block call; an out-of-memory error (CUDA or
CPU) halves the chunk and retries it, with a warning in the log; the numbers stay the same up to float32
rounding of the smaller shapes. The reference engine (patchmap.engines.reference, hooks on a full forward
per layer) stays the ground truth that tests/test_fast_engine.py compares this engine with.

The files: clean.py (the clean run), blocks.py (FastEngine: block calls of patched runs), schedule.py (a
site's runs, grouped and chunked), runs.py (a group's runs through the blocks), edits.py (what a run
writes or blocks), head.py (the output head), kernels.py (the engine's attention and activation kernels),
driver.py (run_fast: the job, batch by batch, and its metrics).
"""

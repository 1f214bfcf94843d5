"""The patching engines: `reference` (forward hooks on the model's own modules, one full forward per
layer; the ground truth) and `fast` (the decoder blocks called directly, many runs per call). Both take a
patchmap.job.PatchJob and return the same per-site datasets; `hooks` and `memory` hold what they share.
patchmap.patching chooses one."""

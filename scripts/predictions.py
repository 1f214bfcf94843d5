import torch

from patchmap import stages

torch.set_num_threads(snakemake.threads)
with stages.reported_errors(snakemake.log[0]):
    stages.predictions(snakemake.config, snakemake.wildcards.model, snakemake.wildcards.dataset,
                       snakemake.wildcards.dtype, snakemake.input.facts, snakemake.input.model, snakemake.output[0])

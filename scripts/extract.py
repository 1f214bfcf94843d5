import torch

from patchmap import stages

torch.set_num_threads(snakemake.threads)
with stages.reported_errors(snakemake.log[0]):
    stages.extract(snakemake.config, snakemake.wildcards.run, snakemake.input.pairs, snakemake.wildcards.shard,
                   snakemake.input.model, snakemake.output[0])

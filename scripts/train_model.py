import torch

from patchmap import stages

torch.set_num_threads(snakemake.threads)
with stages.reported_errors(snakemake.log[0]):
    stages.train_model(snakemake.config, snakemake.wildcards.model, snakemake.output[0])

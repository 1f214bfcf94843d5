import torch

from patchmap import stages

torch.set_num_threads(snakemake.threads)
with stages.reported_errors(snakemake.log[0]):
    stages.patch(snakemake.config, snakemake.wildcards.run, snakemake.input.pairs, snakemake.wildcards.shard,
                 snakemake.input.model, snakemake.output.patch, activations_out=getattr(snakemake.output, "activations", None),
                 ablation_path=getattr(snakemake.input, "ablation", None) or None)

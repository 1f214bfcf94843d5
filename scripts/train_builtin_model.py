from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.train_builtin_model(snakemake.wildcards.model, snakemake.params.model, snakemake.params.world,
                               snakemake.output[0])

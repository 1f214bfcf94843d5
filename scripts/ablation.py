from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.ablation(snakemake.config, snakemake.wildcards.run, list(snakemake.input), snakemake.output[0])

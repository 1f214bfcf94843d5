from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.pairs(snakemake.config, snakemake.wildcards.run, snakemake.input.facts, snakemake.input.predictions,
                 snakemake.input.model, snakemake.output[0])

from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.divergence(snakemake.config, snakemake.wildcards.run, snakemake.input.pairs, list(snakemake.input.patches),
                      snakemake.input.model, (list(snakemake.input.dataset) or [None])[0], snakemake.output[0])

from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.explorer(snakemake.input.divergence, snakemake.input.pairs, snakemake.output[0])

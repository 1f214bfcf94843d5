from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.trace_figure(snakemake.input[0], snakemake.wildcards.fact, snakemake.output.png, snakemake.output.pdf)

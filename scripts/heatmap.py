from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.heatmap(snakemake.input[0], snakemake.output.png, snakemake.output.pdf)

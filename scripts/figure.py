from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.figure(snakemake.config, snakemake.wildcards.figure, list(snakemake.input), snakemake.output.png,
                  snakemake.output.pdf)

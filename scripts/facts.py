from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.facts(snakemake.wildcards.dataset, snakemake.params.dataset, (list(snakemake.input) or [None])[0],
                 snakemake.output[0])

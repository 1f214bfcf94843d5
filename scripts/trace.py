from patchmap import stages
from patchmap.runtime import reported_errors, use_threads

with reported_errors(snakemake.log[0]):
    use_threads(snakemake.threads)
    stages.trace(snakemake.config, snakemake.wildcards.trace, (list(snakemake.input.facts) or [None])[0],
                 snakemake.input.model, snakemake.output[0])

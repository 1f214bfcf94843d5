from patchmap import stages
from patchmap.runtime import reported_errors, use_threads

with reported_errors(snakemake.log[0]):
    use_threads(snakemake.threads)
    stages.extract(snakemake.config, snakemake.wildcards.run, snakemake.input.pairs, snakemake.wildcards.shard,
                   snakemake.input.model, snakemake.output[0])

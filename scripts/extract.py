from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.extract(snakemake.config, snakemake.wildcards.run, snakemake.input.pairs, snakemake.wildcards.shard,
                   snakemake.output[0])

from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.make_pairs_file(snakemake.config, snakemake.wildcards.run, snakemake.input.facts, snakemake.output[0])

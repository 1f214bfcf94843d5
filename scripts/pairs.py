from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.make_pairs_file(snakemake.config, snakemake.wildcards.run, snakemake.input.facts,
                           snakemake.input.predictions, snakemake.input.model, snakemake.output[0])

from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.divergence(snakemake.config, snakemake.wildcards.run, snakemake.input.pairs, list(snakemake.input.patches),
                      snakemake.input.model, snakemake.output[0])

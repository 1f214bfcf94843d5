from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.model_identity(snakemake.config, snakemake.wildcards.model, snakemake.output[0])

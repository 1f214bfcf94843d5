from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.ablation(snakemake.config, snakemake.wildcards.run, list(snakemake.input), snakemake.output[0])

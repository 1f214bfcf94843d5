from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.make_facts(snakemake.config, snakemake.wildcards.dataset, snakemake.output[0])

from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    sites = snakemake.config["runs"][snakemake.wildcards.run]["sites"]
    stages.divergence(snakemake.config, snakemake.wildcards.run, snakemake.input.pairs,
                      {site: snakemake.input[site] for site in sites}, snakemake.output[0])

from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.patch(snakemake.config, snakemake.wildcards.run, snakemake.wildcards.site, snakemake.input.pairs,
                 snakemake.input.activations, snakemake.wildcards.shard, snakemake.output[0],
                 ablation_path=snakemake.input.ablation or None)

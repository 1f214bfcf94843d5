from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.heatmap(snakemake.input[0], snakemake.output.png, snakemake.output.pdf)

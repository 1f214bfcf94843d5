from patchmap import stages

with stages.reported_errors(snakemake.log[0]):
    stages.lines(snakemake.input[0], snakemake.output.png, snakemake.output.pdf)

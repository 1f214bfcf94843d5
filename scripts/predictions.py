from patchmap import stages
from patchmap.runtime import reported_errors, use_threads

with reported_errors(snakemake.log[0]):
    use_threads(snakemake.threads)
    stages.predictions(snakemake.config, snakemake.wildcards.model, snakemake.wildcards.dataset,
                       snakemake.wildcards.dtype, snakemake.params.device, snakemake.params.batch_size,
                       snakemake.input.facts, snakemake.input.model, snakemake.output[0])

from patchmap import stages
from patchmap.runtime import reported_errors, use_threads

with reported_errors(snakemake.log[0]):
    use_threads(snakemake.threads)
    stages.patch(snakemake.config, snakemake.wildcards.run, snakemake.input.pairs, snakemake.wildcards.shard,
                 snakemake.input.model, snakemake.output.patch, activations_out=getattr(snakemake.output, "activations", None),
                 ablation_path=getattr(snakemake.input, "ablation", None) or None)

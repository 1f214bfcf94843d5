from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.model_identity(snakemake.wildcards.model, snakemake.params.model, snakemake.params.source,
                          snakemake.output[0])

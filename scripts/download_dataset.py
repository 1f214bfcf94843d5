from patchmap import stages
from patchmap.runtime import reported_errors

with reported_errors(snakemake.log[0]):
    stages.download_dataset(snakemake.wildcards.dataset, snakemake.params.url, snakemake.params.sha256,
                            snakemake.output[0])

from patchmap import stages
from patchmap.explorer import write_explorer

with stages.reported_errors(snakemake.log[0]):
    write_explorer(snakemake.input.divergence, snakemake.input.pairs, snakemake.output[0])

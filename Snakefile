# patchmap: activation-patching heatmaps. `snakemake --cores all` runs every run in the config.
from snakemake.utils import min_version

min_version("9.0")


# The built-in default, unless the command line names config files of its own (--configfile),
# which then stand alone rather than being merged into the default's runs. It is read once strictly first,
# so that a YAML mistake in it is one patchmap: line rather than Snakemake's message without a line number.
if not workflow.overwrite_configfiles:
    import sys

    from patchmap.config import load_yaml
    from patchmap.errors import UserError

    try:
        load_yaml("config/config.yaml")
    except UserError as error:
        sys.exit(f"patchmap: {error}")

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/facts.smk"
include: "rules/model.smk"
include: "rules/model_identity.smk"
include: "rules/predictions.smk"
include: "rules/pairs.smk"
include: "rules/extract.smk"
include: "rules/ablation.smk"
include: "rules/patch.smk"
include: "rules/divergence.smk"
include: "rules/plot.smk"
include: "rules/explorer.smk"
include: "rules/trace.smk"


report: "report/workflow.rst"


rule all:
    input:
        expand(rules.divergence.output[0], run=config["runs"]),
        expand(rules.heatmap.output, run=config["runs"]),
        expand(rules.lines.output, run=cfg.runs_with_site_rows(config)),
        expand(rules.explorer.output, run=config["runs"]),
        expand(rules.figure.output, figure=config["figures"]),
        [expand(rules.trace_figure.output, trace=trace, fact=fact) for trace, fact in traced_facts()],
    default_target: True


onsuccess:
    print(where_to_look(config["runs"]))

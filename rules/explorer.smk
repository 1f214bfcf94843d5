# results/{run}/explorer.html: the run's numbers in one self-contained page (patchmap/explorer.py)
rule explorer:
    input:
        divergence=rules.divergence.output[0],
        pairs=rules.pairs.output[0],
    output:
        report(
            "results/{run}/explorer.html",
            caption="../report/explorer.rst",
            category="Explorers",
            labels={"run": "{run}", "figure": "explorer"},
        ),
    log:
        "results/{run}/logs/explorer.log",
    benchmark:
        "results/{run}/benchmarks/explorer.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/explorer.py"


def where_to_look(runs):
    """What the workflow prints when it finishes: each finished run's heatmap, explorer and table command."""
    lines = []
    for run in runs:
        divergence = filled(rules.divergence.output[0], run=run)
        if not os.path.exists(divergence):
            continue
        heatmap, explorer = filled(rules.heatmap.output.png, run=run), filled(rules.explorer.output[0], run=run)
        lines.append(f"patchmap run '{run}':")
        if os.path.exists(heatmap):
            lines.append(f"  heatmap   {heatmap}")
        if os.path.exists(explorer):
            lines.append(f"  explorer  {explorer}  (open it in a web browser; it needs no server)")
        lines.append(f"  table     python -m patchmap.summary {divergence}")
    return "\n".join(lines)

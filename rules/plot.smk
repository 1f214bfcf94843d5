rule heatmap:
    input:
        rules.divergence.output[0],
    output:
        png=report(
            "results/{run}/heatmap.png",
            caption="../report/heatmap.rst",
            category="Heatmaps",
            labels={"run": "{run}", "figure": "heatmap"},
        ),
        pdf="results/{run}/heatmap.pdf",
    log:
        "results/{run}/logs/heatmap.log",
    benchmark:
        "results/{run}/benchmarks/heatmap.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/heatmap.py"


rule lines:
    input:
        rules.divergence.output[0],
    output:
        png=report(
            "results/{run}/lines.png",
            caption="../report/lines.rst",
            category="Per-layer lines",
            labels={"run": "{run}", "figure": "lines"},
        ),
        pdf="results/{run}/lines.pdf",
    log:
        "results/{run}/logs/lines.log",
    benchmark:
        "results/{run}/benchmarks/lines.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/lines.py"


rule figure:
    input:
        lambda w: expand(rules.divergence.output[0], run=config["figures"][w.figure]["runs"]),
    output:
        png=report(
            "results/figures/{figure}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        pdf="results/figures/{figure}.pdf",
    params:
        figure=lambda w: config["figures"][w.figure],
    log:
        "results/figures/logs/{figure}.log",
    benchmark:
        "results/figures/benchmarks/{figure}.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/figure.py"

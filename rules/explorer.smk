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


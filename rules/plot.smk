rule heatmap:
    input:
        "results/{run}/divergence.nc",
    output:
        png="results/{run}/heatmap.png",
        pdf="results/{run}/heatmap.pdf",
    log:
        "results/{run}/logs/heatmap.log",
    benchmark:
        "results/{run}/benchmarks/heatmap.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/heatmap.py"

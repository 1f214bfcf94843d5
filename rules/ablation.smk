rule ablation:
    input:
        lambda w: expand(rules.extract.output[0], run=w.run, shard=shards(w.run)),
    output:
        "results/{run}/ablation.nc",
    params:
        run=run_of,
    log:
        "results/{run}/logs/ablation.log",
    benchmark:
        "results/{run}/benchmarks/ablation.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/ablation.py"

rule facts:
    input:
        dataset_input,
    output:
        "results/{run}/facts.jsonl",
    params:
        dataset=lambda w: config["datasets"][run_of(w)["dataset"]],
    log:
        "results/{run}/logs/facts.log",
    benchmark:
        "results/{run}/benchmarks/facts.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/facts.py"

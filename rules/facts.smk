rule facts:
    input:
        lambda w: dataset_file(w.dataset),
    output:
        "results/datasets/{dataset}/facts.jsonl",
    params:
        dataset=lambda w: config["datasets"][w.dataset],
    log:
        "results/datasets/logs/{dataset}.facts.log",
    benchmark:
        "results/datasets/benchmarks/{dataset}.facts.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/facts.py"

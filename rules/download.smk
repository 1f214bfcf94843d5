rule download_dataset:
    output:
        "results/datasets/{dataset}.{ext}",
    params:
        url=lambda w: config["datasets"][w.dataset]["url"],
        sha256=lambda w: config["datasets"][w.dataset].get("sha256"),
    log:
        "results/datasets/logs/{dataset}.{ext}.log",
    benchmark:
        "results/datasets/benchmarks/{dataset}.{ext}.tsv"
    wildcard_constraints:
        ext="json|jsonl",
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/download_dataset.py"

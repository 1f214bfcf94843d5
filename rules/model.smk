rule train_builtin_model:
    output:
        directory("results/models/{model}"),
    params:
        model=lambda w: config["models"][w.model],
        world=lambda w: config["datasets"][config["models"][w.model]["builtin"]["dataset"]],
    log:
        "results/models/logs/{model}.log",
    benchmark:
        "results/models/benchmarks/{model}.tsv"
    threads: workflow.cores
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/train_model.py"

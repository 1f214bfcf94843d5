rule train_builtin_model:
    output:
        directory("results/models/{model}"),
    params:
        model=lambda w: without_resources(config["models"][w.model]),
        world=lambda w: config["datasets"][config["models"][w.model]["builtin"]["dataset"]],
    log:
        "results/models/logs/{model}.log",
    benchmark:
        "results/models/benchmarks/{model}.tsv"
    threads: model_threads
    resources:
        gpu=model_gpus,
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/train_builtin_model.py"

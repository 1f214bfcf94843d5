rule predictions:
    input:
        facts=rules.facts.output[0],
        model=model_identity,
    output:
        "results/predictions/{model}/{dataset}/{dtype}.nc",
    params:
        # what the predictions depend on besides model, dataset and dtype (a change in a run's other
        # settings must not redo them)
        device=job_device,
        batch_size=lambda w: predicting_run(w)["batch_size"],
    log:
        "results/predictions/logs/{model}/{dataset}/{dtype}.log",
    benchmark:
        "results/predictions/benchmarks/{model}/{dataset}/{dtype}.tsv"
    wildcard_constraints:
        dtype="float32|bfloat16|float16",
    priority: 1  # every run waits for it: it starts before the jobs no run waits for (traces) take the cores
    threads: model_threads
    resources:
        gpu=device_gpus,
        gpu_jobs=gpu_job,
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/predictions.py"

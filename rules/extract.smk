rule extract:
    input:
        pairs="results/{run}/pairs.nc",
        model=model_input,
    output:
        "results/{run}/activations/{shard}.nc",
    params:
        run=run_of,
        sites=lambda w: {s: config["sites"][s] for s in run_of(w)["sites"]},
    log:
        "results/{run}/logs/extract/{shard}.log",
    benchmark:
        "results/{run}/benchmarks/extract/{shard}.tsv"
    threads: model_threads
    resources:
        gpu=model_gpus,
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/extract.py"

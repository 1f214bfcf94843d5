rule patch:
    input:
        pairs="results/{run}/pairs.nc",
        activations="results/{run}/activations/{shard}.nc",
        ablation=ablation_input,
        model=model_input,
    output:
        "results/{run}/patch/{site}/{shard}.nc",
    params:
        run=run_of,
        site=lambda w: config["sites"][w.site],
    log:
        "results/{run}/logs/patch/{site}/{shard}.log",
    benchmark:
        "results/{run}/benchmarks/patch/{site}/{shard}.tsv"
    threads: model_threads
    resources:
        gpu=model_gpus,
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/patch.py"

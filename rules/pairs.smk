rule pairs:
    input:
        facts="results/{run}/facts.jsonl",
        model=model_input,
    output:
        "results/{run}/pairs.nc",
    params:
        run=run_of,
    log:
        "results/{run}/logs/pairs.log",
    benchmark:
        "results/{run}/benchmarks/pairs.tsv"
    threads: model_threads
    resources:
        gpu=model_gpus,
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/pairs.py"

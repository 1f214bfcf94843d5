# Only an intervention whose values are pooled over the run (ablate) extracts in jobs of its own: its
# patch jobs need every shard's activations first. swap and noise extract inside each shard's patch job;
# knockout never does.
rule extract:
    input:
        pairs=rules.pairs.output[0],
        model=model_identity,
    output:
        "results/{run}/activations/{shard}.nc",
    params:
        run=run_of,
        sites=run_sites,
    log:
        "results/{run}/logs/extract/{shard}.log",
    benchmark:
        "results/{run}/benchmarks/extract/{shard}.tsv"
    wildcard_constraints:
        run=runs_where(lambda intervention: intervention.pooled),
    threads: model_threads
    resources:
        gpu=device_gpus,
        gpu_jobs=gpu_job,
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/extract.py"

# One job per shard patches every site of the run, with one model load. swap and noise extract the
# shard's source activations in the same job (and write them as an output); ablate writes in the pooled
# values of rule ablation, and knockout writes nothing (patch_without_extraction).
rule patch:
    input:
        pairs=rules.pairs.output[0],
        model=model_identity,
    output:
        patch="results/{run}/patch/{shard}.nc",
        activations=rules.extract.output[0],
    params:
        run=run_of,
        sites=run_sites,
    log:
        "results/{run}/logs/patch/{shard}.log",
    benchmark:
        "results/{run}/benchmarks/patch/{shard}.tsv"
    wildcard_constraints:
        run=runs_where(lambda intervention: intervention.extracts_in_patch_job),
    threads: model_threads
    resources:
        gpu=device_gpus,
        gpu_jobs=gpu_job,
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/patch.py"


use rule patch as patch_without_extraction with:
    input:
        pairs=rules.pairs.output[0],
        model=model_identity,
        ablation=ablation_input,
    output:
        patch=rules.patch.output.patch,
    wildcard_constraints:
        run=runs_where(lambda intervention: not intervention.extracts_in_patch_job),

# A checkpoint: the run's shards are planned from the pairs it writes (common.smk, shards), so that no
# patch job is planned for a shard the pairs do not fill.
checkpoint pairs:
    input:
        facts=facts_file,
        predictions=predictions_input,
        model=model_identity,
    output:
        "results/{run}/pairs.nc",
    params:
        run=run_of,
    log:
        "results/{run}/logs/pairs.log",
    benchmark:
        "results/{run}/benchmarks/pairs.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/pairs.py"

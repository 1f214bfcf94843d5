rule divergence:
    input:
        patches=patch_files,
        pairs=rules.pairs.output[0],
        model=model_identity,
        dataset=lambda w: dataset_file(run_of(w)["dataset"]),
    output:
        "results/{run}/divergence.nc",
    params:
        run=run_of,
    log:
        "results/{run}/logs/divergence.log",
    benchmark:
        "results/{run}/benchmarks/divergence.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/divergence.py"

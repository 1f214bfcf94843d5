# results/models/{model}.json: a local checkpoint's sha256 (its files are this rule's inputs, so replacing
# them redoes every result of the model) or a hub model's resolved commit (loads use it).
rule model_identity:
    input:
        model_files,
    output:
        "results/models/{model}.json",
    params:
        # the model without its cluster resources: changing those must not redo its results
        model=lambda w: {k: v for k, v in config["models"][w.model].items() if k != "resources"},
    log:
        "results/models/logs/{model}.identity.log",
    benchmark:
        "results/models/benchmarks/{model}.identity.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/model_identity.py"


# results/models/{model}.json is not a built-in model's directory
ruleorder: model_identity > train_builtin_model

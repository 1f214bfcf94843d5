# results/models/{model}.json: where the model loads from, and a local checkpoint's sha256 (its files are
# this rule's inputs, so replacing them redoes every result of the model) or a hub model's resolved commit
# (loads use it).
rule model_identity:
    input:
        model_files,
    output:
        "results/models/{model}.json",
    params:
        model=lambda w: without_resources(config["models"][w.model]),
        source=lambda w: model_source(w.model),
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

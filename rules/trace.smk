# Token traces of single prompts (config `traces`): one job per trace, with one model load, its facts as the
# groups of one file; then each fact's figure in ROME's layout.
rule trace:
    input:
        model=model_identity,
        facts=trace_facts_file,
    output:
        "results/traces/{trace}/trace.nc",
    params:
        trace=trace_of,
    log:
        "results/traces/{trace}/logs/trace.log",
    benchmark:
        "results/traces/{trace}/benchmarks/trace.tsv"
    threads: model_threads
    resources:
        gpu=device_gpus,
        gpu_jobs=gpu_job,
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/trace.py"


rule trace_figure:
    input:
        rules.trace.output[0],
    output:
        png=report(
            "results/traces/{trace}/{fact}.png",
            caption="../report/trace.rst",
            category="Token traces",
            labels={"trace": "{trace}", "fact": "{fact}"},
        ),
        pdf="results/traces/{trace}/{fact}.pdf",
    log:
        "results/traces/{trace}/logs/{fact}.figure.log",
    benchmark:
        "results/traces/{trace}/benchmarks/{fact}.figure.tsv"
    conda:
        "../envs/patchmap.yaml"
    script:
        "../scripts/trace_figure.py"

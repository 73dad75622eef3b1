"""Evaluation through lm-eval: the paper's Table 1 suite and an offline `local` suite generated from
the synthetic grammar, for any number of models side by side (`topk-ds eval`).

    suites.py       which tasks each suite runs and which metric fills which table column
    run.py          models -> lm-eval in process -> JSON per model + the markdown table
    valid.py        the validation documents of a prepared data directory (the "Valid." column)
    local_tasks.py  the generator of eval/local's data (`topk-ds eval-make-local`)

The task configs themselves are lm-eval YAMLs in the repository's eval/ directory, so the same
evaluation runs as a plain `lm_eval --model hf ... --include_path eval/local`.
"""

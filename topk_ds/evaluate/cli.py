import argparse
from pathlib import Path

from ..arguments import device_args, positive
from ..errors import UserError
from ..io import check_output

from .suites import LOCAL_DIR, LOCAL_SEED, SUITES


def _eval(a):
    if a.out:
        check_output(a.out, "eval")
    if a.suite == "long":  # not lm-eval: see topk_ds/evaluate/long.py
        from .long import DEFAULT_DOCS, evaluate_long

        if a.tasks or a.val_data:
            raise UserError("--suite long has no --tasks or --val-data: it scores its own long documents")
        return evaluate_long(a.models, out=a.out, docs=a.limit or DEFAULT_DOCS, max_length=a.max_length,
                             batch_size=int(a.batch_size) if a.batch_size not in (None, "auto") else 1,
                             device=a.device, dtype=a.dtype)
    from .run import evaluate

    evaluate(a.models, a.suite, tasks=a.tasks, out=a.out, batch_size=a.batch_size or "16", limit=a.limit,
             max_length=a.max_length or 256, val_data=a.val_data, device=a.device, dtype=a.dtype)


def _make_local(a):
    from .local_tasks import make_local_tasks

    written = make_local_tasks(Path(a.out), seed=a.seed)
    print(f"wrote {', '.join(f'{n} items to {f}' for f, n in written.items())} in {a.out}")


def _batch_size(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got '{text}'")
    return text


def add_commands(commands) -> None:
    tasks = "; ".join(f"{s.name}: {', '.join(s.tasks)}" for s in SUITES.values())
    p = commands.add_parser("eval", help="evaluate models with lm-eval and write a Table 1 style table",
                            description="Evaluate one or more models through lm-eval (in process, context length "
                            "--max-length) and write lm-eval's JSON per model plus table.md, one row per model. "
                            "--suite paper: the paper's Table 1 (needs the hub datasets, cached when offline); "
                            f"--suite local: offline tasks of the synthetic grammar shipped in {LOCAL_DIR}.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="a converted model directory, a training run, its "
                   "checkpoints/ or one global_stepN tag, or any Hugging Face causal LM directory (e.g. a dense Llama)")
    p.add_argument("--suite", choices=sorted([*SUITES, "long"]), required=True, help="which set of tasks (long: "
                   "recall of planted facts by distance and perplexity by position, over long documents)")
    p.add_argument("--tasks", nargs="+", metavar="T", help=f"run only these of the suite's tasks ({tasks})")
    p.add_argument("--out", type=Path, help="output directory (default: eval_results/SUITE in the working directory)")
    p.add_argument("--batch-size", type=_batch_size, help="lm-eval batch size, or auto: the largest that fits the "
                   "device, from 64 down (default 16; long: documents per forward pass, default 1)")
    p.add_argument("--limit", type=positive, help="evaluate only the first N items of each task (for a quick look; "
                   "long: the number of documents, default 32)")
    p.add_argument("--max-length", type=positive, help="context length (default 256, the paper's; long: the shortest "
                   "max_seq_len of the models)")
    p.add_argument("--val-data", help="documents of the Valid. column: a prepared data directory (its validation "
                   "split) or a jsonl with a \"text\" field (default: the data the checkpoint models were trained on)")
    device_args(p)
    p.set_defaults(run=_eval)

    p = commands.add_parser("eval-make-local", help="regenerate the local suite's data from the synthetic grammar",
                            description="Write the local suite's jsonl files (fixed seed, streams disjoint from the "
                            "training corpus). Into any directory other than eval/local the task YAMLs are copied "
                            "too, making it a complete lm-eval --include_path.")
    p.add_argument("--out", default=str(LOCAL_DIR), help=f"directory (default {LOCAL_DIR})")
    p.add_argument("--seed", type=int, default=LOCAL_SEED, help=f"seed of the grammar's streams (default {LOCAL_SEED})")
    p.set_defaults(run=_make_local)

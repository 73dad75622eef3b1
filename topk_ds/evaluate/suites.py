"""The two suites: their lm-eval tasks, where the task configs live, and the table columns.

Kept free of heavy imports, so the command line can check task names before loading anything.
"""

from dataclasses import dataclass
from pathlib import Path

# The repository's eval/ directory: lm-eval task YAMLs (+ data for the local suite).
EVAL_DIR = Path(__file__).resolve().parents[2] / "eval"
LOCAL_DIR = EVAL_DIR / "local"
LOCAL_SEED = 0  # seed of the local suite's items (local_tasks.py)


@dataclass(frozen=True)
class Column:
    header: str  # as in the paper's Table 1
    task: str  # lm-eval task name
    metric: str  # key in lm-eval's results[task], "metric,filter"
    percent: bool = False  # accuracies are shown x100, like the paper


@dataclass(frozen=True)
class Suite:
    name: str
    task_dir: str  # our YAMLs, under EVAL_DIR
    tasks: tuple[str, ...]  # in table order
    builtin_dirs: tuple[str, ...]  # lm-eval's own task folders the suite needs (indexing only these is fast)
    columns: tuple[Column, ...]
    note: str  # printed under the table: what the numbers are


PPL, ACC = "Perplexity ↓", "Accuracy ↑"

PAPER = Suite(
    name="paper",
    task_dir="paper",
    tasks=("fineweb_edu_valid", "lambada_openai", "wikitext", "arc_easy", "arc_challenge", "winogrande", "openbookqa",
           "hellaswag"),
    builtin_dirs=("lambada", "wikitext", "arc", "winogrande", "openbookqa", "hellaswag"),
    columns=(
        Column(f"{PPL} Valid.", "fineweb_edu_valid", "word_perplexity,none"),
        Column(f"{PPL} LAMBADA", "lambada_openai", "perplexity,none"),
        Column(f"{PPL} Wikitext", "wikitext", "word_perplexity,none"),
        Column(f"{ACC} LAMBADA", "lambada_openai", "acc,none", percent=True),
        Column(f"{ACC} ARC-e", "arc_easy", "acc,none", percent=True),
        Column(f"{ACC} ARC-c", "arc_challenge", "acc,none", percent=True),
        Column(f"{ACC} Winogrande", "winogrande", "acc,none", percent=True),
        Column(f"{ACC} OBQA", "openbookqa", "acc,none", percent=True),
        Column(f"{ACC} HellaSwag", "hellaswag", "acc,none", percent=True),
    ),
    note="Valid. and Wikitext: word perplexity of whole documents (lm-eval loglikelihood_rolling); LAMBADA: "
         "perplexity of the last word and greedy accuracy; the rest: accuracy (acc; acc_norm is in the JSON). "
         "Context length as given by --max-length (the paper: 256).",
)

LOCAL = Suite(
    name="local",
    task_dir="local",
    tasks=("topk_heldout", "topk_cloze", "topk_topic_mc"),
    builtin_dirs=(),
    columns=(
        Column(f"{PPL} Held-out", "topk_heldout", "word_perplexity,none"),
        Column(f"{PPL} Cloze", "topk_cloze", "perplexity,none"),
        Column(f"{ACC} Cloze", "topk_cloze", "acc,none", percent=True),
        Column(f"{ACC} Topic-MC", "topk_topic_mc", "acc,none", percent=True),
    ),
    note="Synthetic-grammar tasks of eval/local: held-out documents (word perplexity), a last-word cloze "
         "(perplexity and greedy accuracy), 4-way topic continuation (acc; chance 25 %).",
)

SUITES = {s.name: s for s in (PAPER, LOCAL)}

# What each hub task downloads: said in the error when a dataset is neither cached nor reachable.
HUB_DATASETS = {
    "lambada_openai": "EleutherAI/lambada_openai",
    "wikitext": "EleutherAI/wikitext_document_level (wikitext-2-raw-v1)",
    "arc_easy": "allenai/ai2_arc (ARC-Easy)",
    "arc_challenge": "allenai/ai2_arc (ARC-Challenge)",
    "winogrande": "allenai/winogrande (winogrande_xl)",
    "openbookqa": "allenai/openbookqa (main)",
    "hellaswag": "Rowan/hellaswag",
}

"""`topk-ds eval`: models -> lm-eval, in process -> lm-eval's JSON per model + a Table 1 style table.

Everything a user can get wrong (a model path, a task name, the validation data, a dataset that is
not cached offline) is checked before the first model is loaded, so a failing run writes nothing.
"""

import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError
from ..io import atomic_output
from .suites import EVAL_DIR, HUB_DATASETS, SUITES, Suite

DEFAULT_OUT = Path("eval_results")  # + /SUITE
# Bootstrap draws for lm-eval's standard errors of perplexity and the like (its default, 100000,
# costs seconds to minutes per task on CPU); the metrics themselves do not depend on it.
BOOTSTRAP_ITERS = 1000


@dataclass
class ModelSpec:
    path: Path
    kind: str  # "topk": converted directory or training checkpoint (topk_ds.load); "hf": any other HF causal LM
    label: str  # table row / file name: the run's directory name
    step: int | None  # optimizer step of the weights, when known
    dim: int | None
    layers: int | None
    topk: int | None  # k, or None for a dense model
    max_len: int | None  # longest sequence the model is meant for
    data: str | None = None  # the prepared data a training checkpoint was trained on


def evaluate(models: list[str], suite: str, tasks: list[str] | None = None, out: Path | None = None,
             batch_size: str = "16", limit: int | None = None, max_length: int = 256,
             val_data: str | None = None, device="cpu", dtype=None) -> Path:
    """Evaluate every model on the suite, one after another on `device` (each freed before the next is
    loaded); write OUT/LABEL.json per model and OUT/table.md; print the table."""
    from ..devices import resolve

    device, dtype = resolve(device, dtype)
    suite = SUITES[suite]
    tasks = _select_tasks(suite, tasks)
    specs = [describe(Path(m)) for m in models]
    check_max_length(specs, max_length)
    metadata = {}
    if "fineweb_edu_valid" in tasks:
        metadata["val_data"] = str(Path(_val_data(specs, val_data)).resolve())
    if any(t in HUB_DATASETS for t in tasks):
        _offline_if_no_network()
    task_manager, loaded = _load_tasks(suite, tasks, metadata)

    out = Path(out) if out else DEFAULT_OUT / suite.name
    out.mkdir(parents=True, exist_ok=True)
    rows, names = [], _file_names(specs)
    for i, (spec, name) in enumerate(zip(specs, names), 1):
        print(f"[{i}/{len(specs)}] {spec.label}{_step(spec)}: {', '.join(tasks)}", file=sys.stderr, flush=True)
        results = _evaluate_one(spec, loaded, task_manager, batch_size, max_length, limit, device, dtype)
        results["topk_ds"] = {"model": str(spec.path.resolve()), "label": spec.label, "train_step": spec.step,
                              "suite": suite.name, "max_length": max_length, "batch_size": batch_size,
                              "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
        _write(out / f"{name}.json", _dumps(results))
        rows.append((spec, results["results"]))
    table = markdown_table(suite, rows, limit)
    _write(out / "table.md", table + "\n")
    print(table)
    print(f"wrote lm-eval's results for {len(specs)} model(s) ({', '.join(n + '.json' for n in names)}) and "
          f"table.md to {out}/")
    return out


def _select_tasks(suite: Suite, tasks: list[str] | None) -> list[str]:
    if not tasks:
        return list(suite.tasks)
    unknown = [t for t in tasks if t not in suite.tasks]
    if unknown:
        raise UserError(f"unknown task {', '.join(unknown)} for --suite {suite.name}; its tasks are "
                        f"{', '.join(suite.tasks)}")
    return [t for t in suite.tasks if t in tasks]


def describe(path: Path) -> ModelSpec:
    """What a MODEL argument is, from its config alone (no weights are read)."""
    from ..convert.checkpoints import is_hf_dir, locate, run_config

    if not path.exists():
        raise UserError(f"model {path}: no such file or directory")
    label = _label(path)
    if is_hf_dir(path):
        c = _read_config(path)
        _need_tokenizer(path, path)
        return ModelSpec(path, "topk", label, c.get("train_step"), c["dim"], c["n_layers"],
                         c["topk_k"] if c.get("topk_enabled") else None, c.get("max_seq_len"))
    if path.is_dir() and (path / "config.json").is_file():  # another Hugging Face model, e.g. a dense Llama
        c = _read_config(path)
        _need_tokenizer(path, path)
        return ModelSpec(path, "hf", label, None, c.get("hidden_size"), c.get("num_hidden_layers"), None,
                         c.get("max_position_embeddings"))
    source = locate(path)  # a training run, its checkpoints/, one tag, or a state dict
    cfg = run_config(source)
    _need_tokenizer(path, Path(cfg.data.path) / "tokenizer")
    return ModelSpec(path, "topk", label, source.step, cfg.model.dim, cfg.model.n_layers,
                     cfg.topk.k if cfg.topk.enabled else None, cfg.model.max_seq_len, cfg.data.path)


def _label(path: Path) -> str:
    """The run's name: RUN for RUN/, RUN/checkpoints/global_stepN and RUN/hf/global_stepN."""
    p = path.resolve()
    if p.is_file():
        return p.stem
    if re.fullmatch(r"global_step\d+", p.name):
        p = p.parent
    if p.name in ("checkpoints", "hf"):
        p = p.parent
    return p.name


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"model {path}: cannot read config.json ({e})") from None


def _need_tokenizer(model: Path, tok_dir: Path) -> None:
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise UserError(f"model {model}: no tokenizer at {tok_dir}")


def _val_data(specs: list[ModelSpec], val_data: str | None) -> str:
    """--val-data, else the prepared data the (checkpoint) models were trained on."""
    if val_data:
        return val_data
    paths = {s.data for s in specs if s.data}
    if len(paths) == 1:
        return paths.pop()
    why = "the models were trained on different data" if paths else "converted directories do not record their data"
    raise UserError(f"fineweb_edu_valid (the Valid. column) needs the validation documents and {why}: pass "
                    "--val-data DATA_DIR (a prepared data directory) or a jsonl of documents, or leave the task "
                    "out with --tasks")


def _offline_if_no_network() -> None:
    """Without network the hub client retries for ~25 s per dataset before failing; when the hub's host
    does not even resolve, read datasets from the cache only (must run before datasets is imported)."""
    if os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        print(f"no network ({host} does not resolve): reading hub datasets from the local cache only",
              file=sys.stderr)


def _load_tasks(suite: Suite, tasks: list[str], metadata: dict):
    """Build every task once (this reads its dataset); all failures become one line."""
    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task config chatter; progress bars stay
    task_dir = EVAL_DIR / suite.task_dir
    if not task_dir.is_dir():
        raise UserError(f"the task configs of the {suite.name} suite are missing: no {task_dir} (they ship in the "
                        "repository's eval/ directory)")
    builtin = Path(lm_eval.__file__).parent / "tasks"
    manager = TaskManager(include_path=[str(task_dir), *(str(builtin / d) for d in suite.builtin_dirs)],
                          include_defaults=False, metadata=metadata)
    loaded, failed, first_reason = [], [], None
    for name in tasks:
        try:
            loaded.append(manager.load([name])["tasks"][name])
        except UserError as e:  # our own loaders (the validation data)
            raise UserError(f"task {name}: {e}") from None
        except Exception as e:  # any dataset that cannot be read (offline: not cached): reported together
            failed.append(f"{name} needs {HUB_DATASETS[name]}" if name in HUB_DATASETS else name)
            first_reason = first_reason or str(e).splitlines()[0]
    if failed:
        raise UserError(f"cannot load the datasets of {len(failed)} task(s): {'; '.join(failed)} ({first_reason}). "
                        "Hub datasets must be in the Hugging Face datasets cache (HF_DATASETS_CACHE, default "
                        "~/.cache/huggingface/datasets; download them once where there is network, then run with "
                        "HF_DATASETS_OFFLINE=1), or leave those tasks out with --tasks")
    return manager, loaded


def load_model(spec: ModelSpec, device="cpu", dtype=None):
    """(model in eval mode on `device` in `dtype`, tokenizer)."""
    from ..devices import resolve

    device, dtype = resolve(device, dtype)
    if spec.kind == "topk":
        from ..convert.hf_export import load

        return load(spec.path, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec.path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {spec.path} as a Hugging Face causal LM: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer


def rolling_prefix(tokenizer) -> int | None:
    """The token lm-eval puts before each document in rolling perplexity (its default: BOS). Our
    tokenizers already start every encoding with <s>, so BOS would come twice; with </s> the model
    sees `</s> <s> doc`, as in the packed training stream (the one extra scored token, <s> after
    </s>, is near certain for a trained model). Other tokenizers keep lm-eval's default."""
    ids = tokenizer("a")["input_ids"]
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        return tokenizer.eos_token_id
    return None


def _evaluate_one(spec: ModelSpec, tasks: list, task_manager, batch_size: str, max_length: int,
                  limit: int | None, device, dtype) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from ..devices import cost_line, free_device_memory

    model, tokenizer = load_model(spec, device, dtype)
    lm = None
    try:
        flops = model.model.cfg.flops_per_token(max_length, training=False) if spec.kind == "topk" else \
            2.0 * sum(p.numel() for p in model.parameters())  # another causal LM: 2 FLOPs per weight
        print(cost_line(f"eval {spec.label}", request_tokens(tasks, tokenizer, limit), flops, device, dtype),
              file=sys.stderr, flush=True)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                  prefix_token_id=rolling_prefix(tokenizer))
        # lm-eval would bootstrap in a fork()ed pool; a fork of this process (torch's and tqdm's threads, a
        # process group) can deadlock on a lock held at the fork, and one chunk of draws gains nothing from it
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
        return simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=False,
                               bootstrap_iters=BOOTSTRAP_ITERS)
    except torch.cuda.OutOfMemoryError as e:
        raise UserError(f"{spec.label}: out of memory on {device} ({str(e).splitlines()[0]}); choose a smaller "
                        "--batch-size (or auto, which finds the largest that fits)") from None
    finally:
        del model, lm  # the next model finds the device as this one did
        free_device_memory(device)


def check_max_length(specs: list[ModelSpec], max_length: int) -> None:
    for spec in specs:
        if spec.max_len is not None and max_length > spec.max_len:
            raise UserError(f"--max-length {max_length} exceeds the longest sequence {spec.label} is meant for "
                            f"({spec.max_len}); choose --max-length <= {spec.max_len}")


def request_tokens(tasks: list, tokenizer, limit: int | None, sample: int = 256) -> int:
    """About how many tokens the model will read: the text of every request lm-eval builds for `tasks`,
    at the tokens per character of an evenly spaced sample of them."""
    texts = []
    for task in tasks:
        task.build_all_requests(limit=limit)  # lm-eval builds them again when it runs (cheap beside the model)
        texts += ["".join(str(x) for x in instance.args) for instance in task.instances]
    some = texts[::max(1, len(texts) // sample)]
    chars = sum(map(len, some))
    per_char = sum(map(len, tokenizer(some, add_special_tokens=False)["input_ids"])) / chars if chars else 0.0
    return int(sum(map(len, texts)) * per_char)


def _file_names(specs: list[ModelSpec]) -> list[str]:
    """LABEL-stepN, made unique."""
    names = []
    for spec in specs:
        base = re.sub(r"[^\w.-]+", "_", spec.label) + (f"-step{spec.step}" if spec.step is not None else "")
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def _step(spec: ModelSpec) -> str:
    return f" (step {spec.step})" if spec.step is not None else ""


def _dumps(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


def _write(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def markdown_table(suite: Suite, rows: list[tuple[ModelSpec, dict]], limit: int | None = None) -> str:
    """One row per model in the layout of the paper's Table 1 ("–": task not run)."""
    header = ["Model", "Step", "D", "L", "TopK", *(c.header for c in suite.columns)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for spec, results in rows:
        cells = [spec.label, _cell(spec.step), _cell(spec.dim), _cell(spec.layers),
                 "✗" if spec.topk is None else f"✓ k={spec.topk}"]
        for c in suite.columns:
            value = results.get(c.task, {}).get(c.metric)
            cells.append("–" if value is None else f"{100 * value if c.percent else value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = suite.note + (f" Only the first {limit} items of each task (--limit)." if limit else "")
    return "\n".join(lines) + "\n\n" + note


def _cell(value) -> str:
    return "–" if value is None else str(value)

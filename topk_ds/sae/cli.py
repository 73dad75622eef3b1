"""`topk-ds sae train`; the handler imports lazily."""

import argparse
from pathlib import Path

from ..arguments import device_args, positive

TRAIN_HELP = """\
Train a TopK sparse autoencoder (EleutherAI's sparsify) on the residual stream after each given block of
MODEL (a converted directory, a run directory or a checkpoint tag): the hidden state a TopK layer there
sparsifies, so its latents can be compared with the TopK LM's neurons (`topk-ds analyze compare`). The
tokens are the first --tokens tokens of DATA in --seq-len windows, as `analyze stats` reads them
(shuffled once; --seed sets the SAE's initialisation). Memory: 4 bytes per token for the windows.

  OUT/layers.N/{cfg.json,sae.safetensors}  one SAE per layer, the library's own format:
                                           sparsify.SparseCoder.load_many("OUT", local=True)
  OUT/topk_ds.json                         the model and tokens it was trained on, settings, time, FLOPs

Read its latents with --sae OUT on `analyze stats|neuron|browse|trace` and `steer`."""


def layer_list(text: str) -> list[int]:
    """Layers as 0,1 (or repeated: 0 1)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be whole numbers like 0,1; got '{text}'") from None


def _train(a):
    from ..analysis.data import check_data
    from ..convert.hf_export import load
    from ..devices import resolve
    from ..errors import UserError
    from ..io import check_replaceable
    from .library import RECORD
    from .train import check_precision, train_sae

    out = Path(a.out)
    check_replaceable(out, RECORD, "sae train")
    if (out / RECORD).exists() and not a.force:
        raise UserError(f"{out} already holds an SAE; pass --force to replace it")
    check_data(a.data)  # before the model is loaded: a wrong path fails at once
    device, dtype = resolve(a.device, a.dtype)
    check_precision(device, dtype)
    model, tokenizer = load(a.model, tag=a.tag, device=device, dtype=dtype)
    layers = sorted({l for group in a.layers for l in group}) if a.layers else None
    r = train_sae(model, tokenizer, a.data, out, layers=layers, k=a.k, expansion=a.expansion, tokens=a.tokens,
                  seq_len=a.seq_len, split=a.split, seed=a.seed, batch_size=a.batch_size, model_path=a.model)
    short = "" if r["tokens"] >= a.tokens else f" (all the data holds; {a.tokens:,} asked)"
    fvu = ", ".join(f"{v:.3f}" for v in r["fvu"].values())
    print(f"wrote SAEs of layers {', '.join(map(str, r['layers']))} ({r['num_latents']} latents, k={r['k']}; fraction of "
          f"variance unexplained {fvu}) trained on {r['tokens']:,} tokens{short} in {r['seconds']:.0f} s to {out}")


def add_commands(commands) -> None:
    sae = commands.add_parser("sae", help="post-hoc sparse autoencoders on a model's residual stream (the comparison)")
    sub = sae.add_subparsers(dest="sae_command", required=True, parser_class=type(sae))
    p = sub.add_parser("train", help="train TopK SAEs with EleutherAI's sparsify on the residual stream after given blocks",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="converted model directory, run directory or checkpoint tag")
    p.add_argument("--data", required=True, help="prepared data directory, or .txt/.jsonl/.parquet text")
    p.add_argument("--out", required=True, help="directory to write the SAEs to")
    p.add_argument("--layers", type=layer_list, nargs="+",
                   help="blocks whose output to encode, e.g. 0,1 (default: those a TopK layer sparsifies, all but the "
                        "last topk.n_nontopk)")
    p.add_argument("--k", type=positive, default=None, help="latents active per token (default: the TopK LM's k, "
                   "which a dense twin's config also records)")
    p.add_argument("--expansion", type=positive, default=1,
                   help="latents = EXPANSION x D (default 1: as wide as the TopK layer; 8 is the usual SAE setting)")
    p.add_argument("--tokens", type=positive, default=1_000_000, help="training tokens (default 1,000,000)")
    p.add_argument("--seq-len", type=positive, default=None,
                   help="window length (default: the model's max_seq_len, at most 1024; use the training length)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="split of prepared data (default train)")
    p.add_argument("--batch-size", type=positive, default=16, help="windows per optimizer step (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the SAE's initialisation (default 0)")
    p.add_argument("--tag", help="checkpoint tag when MODEL is a run directory (default: the newest complete one)")
    p.add_argument("--force", action="store_true", help="replace an SAE already in --out")
    device_args(p)
    p.set_defaults(run=_train)

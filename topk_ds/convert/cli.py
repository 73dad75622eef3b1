from pathlib import Path


def _convert(a):
    from .hf_export import convert

    out = convert(Path(a.checkpoint), Path(a.out) if a.out else None, tag=a.tag, dtype=a.dtype, force=a.force,
                  tokenizer=a.tokenizer, config=a.config)
    print(f"wrote a Hugging Face model to {out} (load it with AutoModelForCausalLM.from_pretrained("
          f"'{out}', trust_remote_code=True))")


def add_commands(commands) -> None:
    p = commands.add_parser("convert", help="turn a (sharded) DeepSpeed checkpoint into a Hugging Face model directory",
                            description="Consolidate ZeRO shards with DeepSpeed's zero_to_fp32 and write config.json, "
                            "model.safetensors, the tokenizer, generation_config.json (the paper's sampling) and the "
                            "modeling code, so AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) works "
                            "without topk_ds. Written to a temporary directory, then renamed.")
    p.add_argument("checkpoint", help="a run directory, its checkpoints/ directory, one global_stepN tag, or a "
                   ".pt/.safetensors state dict")
    p.add_argument("out", nargs="?", help="output directory (default: RUN/hf/global_stepN)")
    p.add_argument("--tag", help="checkpoint tag, e.g. global_step2000 (default: the newest complete one)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype to write (default fp32)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the run's data.path/tokenizer)")
    p.add_argument("--config", help="run config (preset or YAML) for a bare state dict (default: config.yaml beside it)")
    p.set_defaults(run=_convert)

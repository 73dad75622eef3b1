"""`topk-ds plan`: will a config fit on a cluster, and how long will it train?

Parameters and FLOPs come from the model's own counts (`ModelConfig.num_params`,
`ModelConfig.flops_per_token`); model-state memory from DeepSpeed's estimators; activation memory
from `activation_bytes`, a formula derived from what this model's autograd graph saves (tested
against measured memory of the tiny model on CPU, tests/test_plan.py).
"""

import dataclasses
import json
import logging
import math

from .errors import UserError

# Per-GPU memory (nominal, counted as GiB; nvidia-smi shows 140.4 / 79.6 / 80.0 GiB) and the dense
# bf16 tensor-core peak without sparsity (SXM parts).
GPUS = {"h200": (141, 989e12), "h100": (80, 989e12), "a100": (80, 312e12)}
# Share of GPU memory left free for what the estimates leave out: the CUDA context, NCCL and ZeRO
# communication buckets, matmul workspaces, allocator fragmentation.
MARGIN = 0.10
DEFAULT_VOCAB = 32000  # the paper's Llama tokenizer, assumed when the config leaves vocab_size to the data
GIB = 2**30


def activation_bytes(cfg, micro_batch: int, seq_len: int, dtype_bytes: int = 2, checkpointing: bool = False,
                     annealing: bool = True) -> dict:
    """Activation memory of one training micro-batch on one GPU, in bytes: `saved` is what autograd
    holds at the end of the forward pass, `peak` the most held at once during forward + backward.

    Per token, with b = dtype_bytes (2 in bf16), D dim, F ffn_dim, H heads, G kv heads, d head_dim,
    V vocab, k TopK k, W the TopK width (D at the residual site, F at the mlp site):

        RMSNorm    4D + 4 + 2bD     fp32 copy of its input and fp32 rstd (the norm runs in fp32),
                                    normalised x cast back (the gain's input), x * gain (the next
                                    matmul's input); in fp32 the "copy" is the input itself
        attention  b(H + 2G)d       fused wqkv output (SDPA keeps v, a view into it)
                 + b(H + G)d        q and k after RoPE (SDPA's inputs; RoPE keeps only cos/sin)
                 + bHd + 4H         SDPA output (wo's input) and its fp32 logsumexp
        SwiGLU     4bF              w1 output (silu keeps it), w3 output (the product keeps it),
                                    silu(gate), silu(gate) * up (w2's input)
        TopK       3k (+ W)         int16 indices and a bool "kept entry > 0" per kept entry (int64
                                    indices when W > 32767: 9k); the bool dense relu mask W only
                                    while alpha > 0 (annealing) with act=relu
        block      2 RMSNorm + attention + SwiGLU (+ TopK in the first L - n_nontopk blocks)
        head       RMSNorm + 4V     final norm; fp32 log-softmax of the logits, kept by cross-entropy

        N         = micro_batch * seq_len
        saved     = N (sum of blocks + head)
        saved_ckpt= N (L bD + head)                 a checkpointed block keeps only its input
        peak      = saved + 8NV                     backward starts with the fp32 gradients of the
                                                    log-probs and of the logits both alive
        peak_ckpt = max(saved_ckpt + 8NV,           the same moment, or
                        N (L bD + block + 2bF))     one block recomputed for its backward, at the
                                                    SwiGLU product's backward: the gradients of
                                                    silu(gate) and up are made, only w2's input freed

    Not counted (each under 0.1 % at the paper's shapes): token ids and targets, RoPE cos/sin
    tables, the loss scalar.
    """
    m, t = cfg.model, cfg.topk
    b, D, F, H, G, d = dtype_bytes, m.dim, m.ffn_dim, m.n_heads, m.kv_heads, m.head_dim
    V = m.vocab_size
    norm = 4 * D + 4 + 2 * b * D
    attention = b * (H + 2 * G) * d + b * (H + G) * d + b * H * d + 4 * H
    swiglu = 4 * b * F
    dense_block = 2 * norm + attention + swiglu
    width = t.width(m)
    topk = (3 if width <= 32767 else 9) * t.k + (width if annealing and t.act == "relu" else 0)
    blocks = [dense_block + (topk if t.is_topk_layer(i, m.n_layers) else 0) for i in range(m.n_layers)]
    head = norm + 4 * V
    N = micro_batch * seq_len
    if not checkpointing:
        saved = N * (sum(blocks) + head)
        return {"saved": saved, "peak": saved + 8 * N * V}
    inputs = m.n_layers * b * D
    saved = N * (inputs + head)
    recompute = N * (inputs + max(blocks) + 2 * b * F)
    return {"saved": saved, "peak": max(saved + 8 * N * V, recompute)}


def largest_layer_params(m) -> int:
    """The most parameters any one module holds directly (DeepSpeed's `model_to_params` rule): ZeRO-3
    gathers one module's parameters at a time."""
    V = m.vocab_size
    return max(V * m.dim, m.ffn_dim * m.dim, (m.n_heads + 2 * m.kv_heads) * m.head_dim * m.dim)


def model_state_bytes(total: int, largest: int, gpus_per_node: int, nodes: int, zero: int, offload: bool) -> tuple[int, int]:
    """(bytes per GPU, host bytes per node) for bf16 params + fp32 master, grads and Adam, from
    DeepSpeed's estimators. ZeRO-3 --offload moves both optimizer and parameters to the CPU."""
    log = logging.getLogger("DeepSpeed")  # logs to stdout on import without a GPU: keep --json clean
    was_disabled, log.disabled = log.disabled, True
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    finally:
        log.disabled = was_disabled

    if zero == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=offload)
        return gpu, cpu
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=offload)
    if zero == 1:  # DeepSpeed has no stage-1 estimator: stage 1 keeps the whole 16-bit gradient on every GPU
        gpu += 2 * total - 2 * total // (gpus_per_node * nodes)
    return gpu, cpu


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def plan(cfg, gpus_per_node: int, nodes: int = 1, gpu: str = "h200", zero: int = 3, offload: bool = False,
         tokens: float = 20e9, mfu: float = 0.4, micro_batch: int | None = None, seq_len: int | None = None) -> dict:
    """Memory per GPU and training time of `cfg` on `nodes` x `gpus_per_node` GPUs, in bf16.
    Memory in bytes, time in seconds; micro_batch and seq_len default to the config's."""
    m, t = cfg.model, cfg.topk
    gpu = gpu.lower()
    _check(gpu in GPUS, f"--gpu {gpu} is not known; choose one of: {', '.join(GPUS)}")
    _check(gpus_per_node >= 1, f"--gpus-per-node {gpus_per_node} must be >= 1")
    _check(nodes >= 1, f"--nodes {nodes} must be >= 1")
    _check(zero in (1, 2, 3), f"--zero {zero} must be 1, 2 or 3")
    _check(tokens > 0, f"--tokens {tokens:g} must be > 0")
    _check(0 < mfu <= 1, f"--mfu {mfu:g} must be in (0, 1]")
    micro_batch = cfg.train.micro_batch if micro_batch is None else micro_batch
    seq_len = cfg.data.seq_len if seq_len is None else seq_len
    _check(micro_batch >= 1, f"--micro-batch {micro_batch} must be >= 1")
    _check(1 <= seq_len <= m.max_seq_len, f"--seq-len {seq_len} must be in [1, model.max_seq_len={m.max_seq_len}]")

    notes = []
    if m.vocab_size is None:
        notes.append(f"model.vocab_size is taken from the data at training time; assumed {DEFAULT_VOCAB:,} "
                     "(the paper's Llama tokenizer); set it with --set model.vocab_size=N")
        m = dataclasses.replace(m, vocab_size=DEFAULT_VOCAB)
        cfg = dataclasses.replace(cfg, model=m)
    if cfg.train.precision != "bf16":
        notes.append(f"train.precision={cfg.train.precision} (a CPU setting); planned for bf16, the GPU precision")
    annealing = t.enabled and t.anneal_ratio > 0
    if annealing and t.act == "relu":
        notes.append("activations count the TopK layers' dense relu masks, held only while alpha > 0 (annealing)")

    gpus = gpus_per_node * nodes
    memory_gib, peak_flops = GPUS[gpu]
    total, largest = m.num_params(), largest_layer_params(m)
    states_gpu, states_cpu = model_state_bytes(total, largest, gpus_per_node, nodes, zero, offload)
    usable = int(memory_gib * GIB * (1 - MARGIN))
    memory = {}
    for name, ckpt in (("plain", False), ("checkpointed", True)):
        act = activation_bytes(cfg, micro_batch, seq_len, 2, ckpt, annealing)
        per_sequence = activation_bytes(cfg, 1, seq_len, 2, ckpt, annealing)["peak"]
        memory[name] = {"activations_saved": act["saved"], "activations_peak": act["peak"],
                        "total": states_gpu + act["peak"], "fits": states_gpu + act["peak"] <= usable,
                        "max_micro_batch": max(0, (usable - states_gpu) // per_sequence)}

    flops = m.flops_per_token(seq_len)
    sequences = micro_batch * cfg.train.grad_accum * gpus
    tokens_per_step = sequences * seq_len
    throughput = gpus * peak_flops * mfu / flops  # tokens/s
    return {
        "model": {"dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.kv_heads,
                  "ffn_dim": m.ffn_dim, "vocab_size": m.vocab_size, "topk": t.enabled, "k": t.k,
                  "topk_layers": sum(t.is_topk_layer(i, m.n_layers) for i in range(m.n_layers)), "site": t.site},
        "cluster": {"gpu": gpu, "gpus_per_node": gpus_per_node, "nodes": nodes, "gpus": gpus, "zero": zero,
                    "offload": offload, "gpu_memory_gib": memory_gib, "peak_flops": peak_flops, "mfu": mfu},
        "params": {"total": total, "non_embedding": m.num_params(embeddings=False), "largest_layer": largest},
        "flops_per_token": flops,
        "batch": {"micro_batch": micro_batch, "seq_len": seq_len, "grad_accum": cfg.train.grad_accum,
                  "global_batch": sequences, "tokens_per_step": tokens_per_step},
        "memory": {"model_states_gpu": states_gpu, "model_states_cpu_per_node": states_cpu, "usable": usable,
                   "margin": MARGIN, "checkpointing_in_config": cfg.train.activation_checkpointing, **memory},
        "training": {"tokens": tokens, "steps": math.ceil(tokens / tokens_per_step), "tokens_per_second": throughput,
                     "seconds": tokens / throughput, "config_steps": cfg.train.steps,
                     "config_tokens": cfg.train.steps * tokens_per_step},
        "notes": notes,
    }


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def format_plan(p: dict) -> str:
    m, c, par, b, mem, tr = p["model"], p["cluster"], p["params"], p["batch"], p["memory"], p["training"]
    topk = (f"TopK k={m['k']} on the first {m['topk_layers']} blocks ({m['site']})" if m["topk"] else "dense")
    offload = ", optimizer + params offloaded to CPU" if c["offload"] and c["zero"] == 3 else \
        ", optimizer offloaded to CPU" if c["offload"] else ""
    plain, ckpt = mem["plain"], mem["checkpointed"]
    rows = [
        ("model states (DeepSpeed estimate)", _gib(mem["model_states_gpu"]), _gib(mem["model_states_gpu"])),
        ("activations saved for backward", _gib(plain["activations_saved"]), _gib(ckpt["activations_saved"])),
        ("activations at peak", _gib(plain["activations_peak"]), _gib(ckpt["activations_peak"])),
        ("total", _gib(plain["total"]), _gib(ckpt["total"])),
        (f"usable ({c['gpu_memory_gib']} GiB less {mem['margin']:.0%})", _gib(mem["usable"]), _gib(mem["usable"])),
        ("fits", "yes" if plain["fits"] else "NO", "yes" if ckpt["fits"] else "NO"),
        ("largest micro-batch that fits", str(plain["max_micro_batch"]), str(ckpt["max_micro_batch"])),
    ]
    in_config = "checkpointed" if mem["checkpointing_in_config"] else "plain"
    lines = [
        f"model     D={m['dim']} L={m['n_layers']} heads={m['n_heads']}"
        f"{'' if m['n_kv_heads'] == m['n_heads'] else ' kv_heads=' + str(m['n_kv_heads'])} ffn={m['ffn_dim']} "
        f"vocab={m['vocab_size']:,}, {topk}",
        f"params    {par['total']:,} total, {par['non_embedding']:,} without the input embedding; "
        f"largest layer {par['largest_layer']:,} (ZeRO-3 gathers it whole)",
        f"FLOPs     {p['flops_per_token'] / 1e9:.2f} GFLOP per token for training at seq {b['seq_len']} "
        "(matmuls + attention; TopK adds O(D) comparisons per token, negligible)",
        f"cluster   {c['nodes']} node{'s' if c['nodes'] > 1 else ''} x {c['gpus_per_node']} {c['gpu'].upper()} = {c['gpus']} GPUs, "
        f"ZeRO-{c['zero']}{offload}, bf16",
        f"batch     micro {b['micro_batch']} x accum {b['grad_accum']} x {c['gpus']} GPUs = {b['global_batch']} "
        f"sequences = {b['tokens_per_step']:,} tokens per step",
        "",
        f"memory per GPU (GiB)                {'plain':>10} {'checkpointed':>13}   (the config: {in_config})",
        *(f"  {label:33} {a:>10} {b_:>13}" for label, a, b_ in rows),
        f"host memory per node (DeepSpeed estimate): {_gib(mem['model_states_cpu_per_node'])} GiB",
        "",
        f"time      {tr['tokens'] / 1e9:g}B tokens = {tr['steps']:,} steps: {_duration(tr['seconds'])} at "
        f"{c['mfu']:.0%} MFU of {c['peak_flops'] / 1e12:g} TFLOP/s per GPU ({tr['tokens_per_second']:,.0f} tokens/s)",
        f"          (the config's train.steps={tr['config_steps']:,} covers {tr['config_tokens'] / 1e9:.2f}B tokens)",
    ]
    lines += [f"note      {n}" for n in p["notes"]]
    return "\n".join(lines)


def _run(a) -> None:
    from .config import load_config

    result = plan(load_config(a.config, a.overrides), a.gpus_per_node, a.nodes, a.gpu, a.zero, a.offload,
                  a.tokens, a.mfu, a.micro_batch, a.seq_len)
    print(json.dumps(result, indent=1) if a.json else format_plan(result))


def add_commands(commands) -> None:
    from .arguments import config_args

    p = commands.add_parser("plan", help="memory per GPU and training time of a config on a GPU cluster")
    config_args(p)
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node, e.g. 8")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpu", default="h200", help=f"GPU type: {', '.join(GPUS)} (default h200)")
    p.add_argument("--zero", type=int, default=3, help="ZeRO stage 1, 2 or 3 (default 3)")
    p.add_argument("--offload", action="store_true", help="offload the optimizer (ZeRO-3: and the parameters) to CPU")
    p.add_argument("--tokens", type=float, default=20e9, help="training token budget (default 20e9)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the time (default 0.4)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per micro-step (default: train.micro_batch)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.seq_len)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_run)

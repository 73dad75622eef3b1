"""`topk-ds plan`: will a config fit on a cluster, and how long will it train?

Parameters and FLOPs come from the model's own counts (`ModelConfig.num_params`,
`ModelConfig.flops_per_token`); model-state memory from DeepSpeed's estimators; activation memory
from `activation_bytes`, a formula derived from what this model's autograd graph saves (tested
against measured memory of the tiny model on CPU, tests/test_plan.py). The step time is the compute
at an assumed share of the peak (`--mfu`) plus the communication that overlap cannot hide
(`communication`): the bytes each ZeRO stage moves per step over NVLink within a node and
InfiniBand across nodes, with the knobs of a DeepSpeed JSON (`--ds-config`).
"""

import contextlib
import dataclasses
import json
import logging
import math

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class Gpu:
    memory_gib: int  # nominal, counted as GiB (nvidia-smi shows 140.4 / 79.6 / 80.0 GiB)
    peak: float  # dense bf16 tensor-core FLOP/s without sparsity (SXM parts)
    nvlink: float  # NVLink bytes/s per GPU and direction (half the datasheet's bidirectional figure)
    pcie: float  # host link bytes/s per direction (PCIe Gen5 / Gen4 x16)


GPUS = {"h200": Gpu(141, 989e12, 450e9, 64e9), "h100": Gpu(80, 989e12, 450e9, 64e9),
        "a100": Gpu(80, 312e12, 300e9, 32e9)}
IB = 50e9  # InfiniBand bytes/s per GPU: one 400 Gb/s NDR port per GPU, as in DGX H100/H200 nodes
# Seconds per collective call, added to its transfer time: 0 by default (a bandwidth model); about
# 20e-6 (NCCL's small-message latency) shows what many small buckets or fetch units cost.
LATENCY = 0.0
REFERENCE_GPUS = 8  # the paper's one node of 8 H200: the presets' global batch assumes it
# Share of GPU memory left free for what the estimates leave out: the CUDA context, NCCL buffers,
# matmul workspaces, allocator fragmentation.
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


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed logs to stdout when first imported on a machine without GPUs: keep --json clean."""
    log = logging.getLogger("DeepSpeed")
    was_disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = was_disabled


def model_state_bytes(total: int, largest: int, gpus_per_node: int, nodes: int, zero: int, offload: bool,
                      offload_params: bool | None = None) -> tuple[int, int]:
    """(bytes per GPU, host bytes per node) for bf16 params + fp32 master, grads and Adam, from
    DeepSpeed's estimators. `offload`: the optimizer on the CPU; under ZeRO-3 also the parameters
    unless `offload_params` says otherwise."""
    with _quiet_deepspeed():
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if zero == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, cpu_offload=offload,
            cpu_offload_params=offload if offload_params is None else offload_params)
        return gpu, cpu
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=offload)
    if zero == 1:  # DeepSpeed has no stage-1 estimator: stage 1 keeps the whole 16-bit gradient on every GPU
        gpu += 2 * total - 2 * total // (gpus_per_node * nodes)
    return gpu, cpu


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclasses.dataclass(frozen=True)
class ZeroKnobs:
    """The DeepSpeed settings the communication model reads, as DeepSpeed's own config parses them
    (its defaults where the JSON is silent)."""

    stage: int
    overlap_comm: bool
    reduce_bucket: int  # elements per gradient reduce-scatter
    allgather_bucket: int  # elements per parameter all-gather after a ZeRO-1/2 optimizer step
    prefetch_bucket: int  # ZeRO-3: elements gathered ahead of use
    persistence_threshold: int  # ZeRO-3: tensors smaller than this stay whole on every GPU
    granularity_threshold: int  # ZeRO-3: modules this fine are fetched as one unit
    offload_optimizer: bool
    offload_params: bool
    hpz: int  # ZeRO++ hpZ: a secondary copy of the parameters sharded over this many GPUs
    quantized_weights: bool  # ZeRO++ qwZ: parameter all-gathers in int8
    quantized_gradients: bool  # ZeRO++ qgZ: gradient reduce-scatter in int4 (hierarchical all-to-all)


def zero_knobs(ds: dict, stage: int | None = None, offload: bool = False) -> ZeroKnobs:
    """The knobs of a resolved DeepSpeed config; `stage` and `offload` override its own."""
    with _quiet_deepspeed():
        from deepspeed.runtime.zero.config import get_zero_config

    section = dict(ds.get("zero_optimization") or {})
    if stage is not None:
        section["stage"] = stage
    section.setdefault("stage", 3)
    if offload:
        section["offload_optimizer"] = {"device": "cpu"}
        if section["stage"] == 3:
            section["offload_param"] = {"device": "cpu"}
    z = get_zero_config({"zero_optimization": section})
    s3 = z.stage == 3

    def offloaded(c):
        return c is not None and getattr(c.device, "value", c.device) != "none"
    return ZeroKnobs(stage=int(z.stage), overlap_comm=bool(z.overlap_comm), reduce_bucket=z.reduce_bucket_size,
                     allgather_bucket=z.allgather_bucket_size, prefetch_bucket=z.prefetch_bucket_size,
                     persistence_threshold=z.param_persistence_threshold,
                     granularity_threshold=z.module_granularity_threshold,
                     offload_optimizer=offloaded(z.offload_optimizer), offload_params=s3 and offloaded(z.offload_param),
                     hpz=z.zero_hpz_partition_size if s3 else 1, quantized_weights=s3 and z.zero_quantized_weights,
                     quantized_gradients=s3 and z.zero_quantized_gradients)


def fetch_units(model, persistence_threshold: int, granularity_threshold: int) -> int:
    """All-gathers per forward (and again per backward) under ZeRO-3: one per module holding
    partitioned tensors (those of at least `persistence_threshold` elements), or one per module that
    DeepSpeed's `stage3_module_granularity_threshold` makes a unit (the outermost non-container
    module whose granularity is at or below it)."""
    import torch.nn as nn

    with _quiet_deepspeed():
        from .train.engine import module_granularity

    def units(module) -> int:
        if not list(module.parameters()):
            return 0
        if granularity_threshold and any(module.children()) and \
                type(module).__name__ not in nn.modules.container.__all__ and \
                module_granularity(module) <= granularity_threshold:
            return 1
        own = any(p.numel() >= persistence_threshold for p in module.parameters(recurse=False))
        return int(own) + sum(units(child) for child in module.children())
    return units(model)


def _split(nbytes: float, gpus_per_node: int, nodes: int) -> tuple[float, float]:
    """Bytes one GPU sends (reduce-scatter) or receives (all-gather) of a collective over all GPUs on
    `nbytes` in all, done hierarchically: NVLink within the node, then InfiniBand across nodes for
    the node's 1/g share. The two add up to a ring's nbytes (N - 1) / N."""
    g, n = gpus_per_node, nodes
    return nbytes * (g - 1) / g, nbytes * (n - 1) / (n * g)


def communication(knobs: ZeroKnobs, params: int, partitioned: int, units: int, gpus_per_node: int, nodes: int,
                  micro_steps: int, compute: float, gpu: Gpu, ib: float, latency: float, extra: list = ()) -> dict:
    """Bytes one GPU moves per optimizer step and the time it costs; `extra`: more rows (sequence parallelism's). `compute`: seconds of one
    micro-step's forward + backward (a third forward, two thirds backward). With overlap_comm a
    collective hides behind the compute of its pass (the parameter all-gather of the forward behind
    the forward, the backward's all-gather and gradient reduce-scatter behind the backward: perfectly,
    an optimistic bound); without it, or after the optimizer step, all of it is exposed. Offload
    traffic crosses PCIe and is counted exposed."""
    k, gpus = knobs, gpus_per_node * nodes
    weight_bytes = 1 if k.quantized_weights else 2
    rows = []

    def collective(name, when, nbytes, calls, within=None):
        if within is None:
            nvlink, inter = _split(nbytes, gpus_per_node, nodes)
        else:  # an hpZ group: the GPUs of one node (or fewer)
            nvlink, inter = nbytes * (within - 1) / within, 0.0
        rows.append({"name": name, "when": when, "calls": calls, "nvlink_bytes": nvlink, "ib_bytes": inter, "pcie_bytes": 0.0,
                     "seconds": nvlink / gpu.nvlink + inter / ib + calls * latency})

    def host(name, when, nbytes):
        rows.append({"name": name, "when": when, "calls": 0, "nvlink_bytes": 0.0, "ib_bytes": 0.0, "pcie_bytes": nbytes,
                     "seconds": nbytes / gpu.pcie})

    reduce_calls = math.ceil(params / k.reduce_bucket)
    grad_bytes = 0.5 if k.quantized_gradients else 2
    if k.stage == 3:
        collective("parameter all-gather, forward", "forward", weight_bytes * partitioned, units)
        hpz = k.hpz if 1 < k.hpz <= gpus_per_node else None
        collective("parameter all-gather, backward" + (" (hpZ, within the node)" if hpz else ""), "backward",
                   weight_bytes * partitioned, units, within=hpz)
        collective("gradient reduce-scatter", "backward", grad_bytes * params, reduce_calls)
        if k.offload_params:
            host("parameter shards from host memory (forward and backward)", "exposed", 2 * 2 * partitioned / gpus)
    else:
        collective("gradient reduce-scatter", "backward" if k.stage == 2 else "last backward", 2 * params, reduce_calls)
        collective("parameter all-gather after the optimizer step", "step", 2 * params,
                   math.ceil(params / k.allgather_bucket))
    if k.offload_optimizer:
        host("fp32 gradient shard to host memory", "exposed", 4 * params / gpus)
        rows[-1]["when"] = "exposed per micro-step" if k.stage > 1 else "exposed"
        host("updated 16-bit parameter shard back", "step", 2 * params / gpus)
    rows += extra

    def total(when):
        return sum(r["seconds"] for r in rows if r["when"] == when)

    hide = k.overlap_comm
    per_micro = (max(0.0, total("forward") - compute / 3) if hide else total("forward")) \
        + (max(0.0, total("backward") - 2 * compute / 3) if hide else total("backward")) \
        + total("exposed per micro-step") + (total("exposed") if k.stage == 3 else 0.0)
    per_step = total("step") + (max(0.0, total("last backward") - 2 * compute / 3) if hide else total("last backward")) \
        + (total("exposed") if k.stage < 3 else 0.0)
    for r in rows:  # bytes per optimizer step
        repeats = 1 if r["when"] in ("step", "last backward") or (r["when"] == "exposed" and k.stage < 3) else micro_steps
        r["per_step"] = repeats
    return {"collectives": rows, "exposed_seconds": micro_steps * per_micro + per_step,
            **{f"{link}_bytes_per_step": sum(r[f"{link}_bytes"] * r["per_step"] for r in rows)
               for link in ("nvlink", "ib", "pcie")}}


def ulysses_traffic(m, micro_batch: int, seq_len: int, sp: int, gpus_per_node: int, checkpointing: bool, gpu: Gpu,
                    ib: float, latency: float) -> list[dict]:
    """Sequence parallelism's all-to-alls in one micro-step, as rows of `communication`: in every layer q, k
    and v go from (T/N positions, all heads) to (all T positions, heads/N) and the attention output comes
    back, in the forward and, as gradients, in the backward (a checkpointed block runs its forward twice).
    A GPU keeps 1/N of what it holds and sends the rest, over NVLink to the group's GPUs in its node and
    InfiniBand to the others. Attention waits for them, so they are counted exposed. TopK adds none: it
    acts on each token's hidden state, which one GPU holds whole."""
    elements = micro_batch * seq_len // sp * (2 * m.n_heads + 2 * m.kv_heads) * m.head_dim  # q, k, v, out of a layer
    sent = 2 * elements * (sp - 1) / sp  # bf16 bytes per layer and pass
    off_node = max(0, sp - gpus_per_node) / (sp - 1)
    rows = []
    for name, passes in (("forward", 2 if checkpointing else 1), ("backward", 1)):
        nvlink, inter, calls = passes * m.n_layers * sent * (1 - off_node), passes * m.n_layers * sent * off_node, 4 * passes * m.n_layers
        rows.append({"name": f"sequence-parallel all-to-all (q, k, v, out), {name}", "when": "exposed per micro-step",
                     "calls": calls, "nvlink_bytes": nvlink, "ib_bytes": inter, "pcie_bytes": 0.0,
                     "seconds": nvlink / gpu.nvlink + inter / ib + calls * latency})
    return rows


def plan(cfg, gpus_per_node: int, nodes: int = 1, gpu: str = "h200", zero: int | None = None, offload: bool = False,
         tokens: float = 20e9, mfu: float = 0.4, micro_batch: int | None = None, seq_len: int | None = None,
         ds_config: dict | None = None, nvlink: float | None = None, ib: float = IB, pcie: float | None = None,
         latency: float = LATENCY) -> dict:
    """Memory per GPU and training time of `cfg` on `nodes` x `gpus_per_node` GPUs, in bf16, under
    ZeRO stage `zero` (default: the DeepSpeed config's, else 3) with the knobs of `ds_config` (a
    resolved DeepSpeed config; DeepSpeed's defaults without one). `mfu`: the share of the peak the
    compute reaches; exposed communication comes on top. Memory in bytes, time in seconds, link
    speeds in bytes/s; micro_batch and seq_len default to the config's."""
    m, t = cfg.model, cfg.topk
    gpu = gpu.lower()
    _check(gpu in GPUS, f"--gpu {gpu} is not known; choose one of: {', '.join(GPUS)}")
    _check(gpus_per_node >= 1, f"--gpus-per-node {gpus_per_node} must be >= 1")
    _check(nodes >= 1, f"--nodes {nodes} must be >= 1")
    _check(zero in (None, 1, 2, 3), f"--zero {zero} must be 1, 2 or 3")
    _check(tokens > 0, f"--tokens {tokens:g} must be > 0")
    _check(0 < mfu <= 1, f"--mfu {mfu:g} must be in (0, 1]")
    micro_batch = cfg.train.micro_batch if micro_batch is None else micro_batch
    seq_len = cfg.data.seq_len if seq_len is None else seq_len
    _check(micro_batch >= 1, f"--micro-batch {micro_batch} must be >= 1")
    _check(1 <= seq_len <= m.max_seq_len, f"--seq-len {seq_len} must be in [1, model.max_seq_len={m.max_seq_len}]")
    device = dataclasses.replace(GPUS[gpu], **{k: v for k, v in (("nvlink", nvlink), ("pcie", pcie)) if v is not None})
    _check(device.nvlink > 0 and device.pcie > 0 and ib > 0 and latency >= 0, "link speeds must be > 0 and the latency >= 0")
    knobs = zero_knobs(ds_config or {}, zero, offload)
    _check(knobs.hpz <= gpus_per_node * nodes, f"zero_hpz_partition_size={knobs.hpz} exceeds the {gpus_per_node * nodes} GPUs")

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
    sp = cfg.train.sequence_parallel
    _check(gpus % sp == 0, f"train.sequence_parallel={sp} does not divide the {gpus} GPUs")
    _check(seq_len % sp == 0, f"train.sequence_parallel={sp} must divide the sequence length {seq_len}")
    if sp > gpus_per_node:
        notes.append(f"train.sequence_parallel={sp} spans nodes: part of every all-to-all crosses InfiniBand")
    total, largest = m.num_params(), largest_layer_params(m)
    states_gpu, states_cpu = model_state_bytes(total, largest, gpus_per_node, nodes, knobs.stage,
                                               knobs.offload_optimizer, knobs.offload_params)
    with _meta_device():
        from .model import Transformer

        model = Transformer(m, t)
    partitioned = sum(p.numel() for p in model.parameters() if knobs.stage < 3 or p.numel() >= knobs.persistence_threshold)
    if knobs.stage == 3:
        with _quiet_deepspeed():
            from .train.engine import check_granularity

        check_granularity(cfg, {"zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": knobs.granularity_threshold}},
                          "--ds-config")
    units = fetch_units(model, knobs.persistence_threshold, knobs.granularity_threshold)
    buffers = 2 * min(knobs.reduce_bucket, total)  # the 16-bit gradient bucket being reduced
    if knobs.stage == 3:
        buffers += 2 * min(knobs.prefetch_bucket, total)
        if knobs.hpz > 1:  # hpZ's secondary copy of the parameters (int8 with qwZ)
            buffers += (1 if knobs.quantized_weights else 2) * partitioned // knobs.hpz
    usable = int(device.memory_gib * GIB * (1 - MARGIN))
    memory, dp, local = {}, gpus // sp, seq_len // sp  # data-parallel GPUs, positions per GPU (both checked exact)
    for name, ckpt in (("plain", False), ("checkpointed", True)):
        # a GPU holds seq_len / N positions of each sequence (Ulysses' attention: all of them for heads / N)
        act = activation_bytes(cfg, micro_batch, local, 2, ckpt, annealing)
        per_sequence = activation_bytes(cfg, 1, local, 2, ckpt, annealing)["peak"]
        used = states_gpu + buffers + act["peak"]
        memory[name] = {"activations_saved": act["saved"], "activations_peak": act["peak"], "total": used,
                        "fits": used <= usable, "max_micro_batch": max(0, (usable - states_gpu - buffers) // per_sequence)}

    flops = m.flops_per_token(seq_len)
    sequences = micro_batch * cfg.train.grad_accum * dp
    tokens_per_step = sequences * seq_len
    compute = micro_batch * local * flops / (device.peak * mfu)  # one micro-step, seconds
    ulysses = ulysses_traffic(m, micro_batch, seq_len, sp, gpus_per_node, cfg.train.activation_checkpointing, device,
                              ib, latency) if sp > 1 else []
    comm = communication(knobs, total, partitioned, units, gpus_per_node, nodes, cfg.train.grad_accum, compute,
                         device, ib, latency, ulysses)
    step = cfg.train.grad_accum * compute + comm["exposed_seconds"]
    throughput = tokens_per_step / step  # tokens/s
    reference = cfg.train.micro_batch * cfg.train.grad_accum * REFERENCE_GPUS // sp
    if sequences != reference:
        keep = reference / (micro_batch * dp)
        advice = (f"set train.grad_accum={keep:g} to keep it" if keep == int(keep) and keep >= 1 else
                  "change train.micro_batch or train.grad_accum to keep it")
        notes.append(f"the global batch (micro x accum x GPUs) changes with the GPU count: {sequences:,} sequences here, "
                     f"{reference:,} with the config on {REFERENCE_GPUS} GPUs, which its learning rate and schedule "
                     f"assume; {advice}")
    if knobs.offload_optimizer:
        notes.append("the optimizer step runs on the CPU (DeepSpeed's CPU Adam); its time is not modelled, only the PCIe traffic")
    if knobs.quantized_weights or knobs.quantized_gradients:
        notes.append("ZeRO++ qwZ/qgZ use DeepSpeed's quantizer op, which compiles with nvcc at first use: install "
                     "DeepSpeed with DS_BUILD_QUANTIZER=1 on images without nvcc")
    return {
        "model": {"dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.kv_heads,
                  "ffn_dim": m.ffn_dim, "vocab_size": m.vocab_size, "topk": t.enabled, "k": t.k,
                  "topk_layers": sum(t.is_topk_layer(i, m.n_layers) for i in range(m.n_layers)), "site": t.site},
        "cluster": {"gpu": gpu, "gpus_per_node": gpus_per_node, "nodes": nodes, "gpus": gpus, "zero": knobs.stage,
                    "offload": knobs.offload_optimizer, "offload_params": knobs.offload_params,
                    "gpu_memory_gib": device.memory_gib, "peak_flops": device.peak, "mfu": mfu,
                    "links": {"nvlink": device.nvlink, "ib": ib, "pcie": device.pcie, "latency": latency}},
        "zero": dataclasses.asdict(knobs),
        "params": {"total": total, "non_embedding": m.num_params(embeddings=False), "largest_layer": largest,
                   "partitioned": partitioned, "fetch_units": units},
        "flops_per_token": flops,
        "batch": {"micro_batch": micro_batch, "seq_len": seq_len, "grad_accum": cfg.train.grad_accum,
                  "sequence_parallel": sp, "data_parallel": dp,
                  "global_batch": sequences, "tokens_per_step": tokens_per_step},
        "memory": {"model_states_gpu": states_gpu, "model_states_cpu_per_node": states_cpu, "zero_buffers": buffers,
                   "usable": usable, "margin": MARGIN, "checkpointing_in_config": cfg.train.activation_checkpointing,
                   **memory},
        "communication": comm,
        "step": {"compute_seconds": cfg.train.grad_accum * compute, "exposed_communication_seconds": comm["exposed_seconds"],
                 "seconds": step, "mfu": flops * throughput / (gpus * device.peak)},
        "training": {"tokens": tokens, "steps": math.ceil(tokens / tokens_per_step), "tokens_per_second": throughput,
                     "seconds": tokens / tokens_per_step * step, "config_steps": cfg.train.steps,
                     "config_tokens": cfg.train.steps * tokens_per_step},
        "notes": notes,
    }


@contextlib.contextmanager
def _meta_device():
    import torch

    with torch.device("meta"):
        yield


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _zero_name(p: dict) -> str:
    c, z = p["cluster"], p["zero"]
    extras = [name for name, on in (("optimizer offload", c["offload"]), ("param offload", c["offload_params"]),
                                     (f"hpZ {z['hpz']}", z["hpz"] > 1), ("qwZ", z["quantized_weights"]),
                                     ("qgZ", z["quantized_gradients"])) if on]
    return f"ZeRO-{c['zero']}" + (f" ({', '.join(extras)})" if extras else "")


def _header(p: dict) -> list[str]:
    m, c, par, b = p["model"], p["cluster"], p["params"], p["batch"]
    topk = (f"TopK k={m['k']} on the first {m['topk_layers']} blocks ({m['site']})" if m["topk"] else "dense")
    links = c["links"]
    return [
        f"model     D={m['dim']} L={m['n_layers']} heads={m['n_heads']}"
        f"{'' if m['n_kv_heads'] == m['n_heads'] else ' kv_heads=' + str(m['n_kv_heads'])} ffn={m['ffn_dim']} "
        f"vocab={m['vocab_size']:,}, {topk}",
        f"params    {par['total']:,} total, {par['non_embedding']:,} without the input embedding; "
        f"largest layer {par['largest_layer']:,} (ZeRO-3 gathers it whole)",
        f"FLOPs     {p['flops_per_token'] / 1e9:.2f} GFLOP per token for training at seq {b['seq_len']} "
        "(matmuls + attention; TopK adds O(D) comparisons per token, negligible)",
        f"cluster   {c['nodes']} node{'s' if c['nodes'] > 1 else ''} x {c['gpus_per_node']} {c['gpu'].upper()} = {c['gpus']} GPUs, bf16; "
        f"links per GPU: NVLink {links['nvlink'] / 1e9:g} GB/s, InfiniBand {links['ib'] / 1e9:g} GB/s, "
        f"PCIe {links['pcie'] / 1e9:g} GB/s, {links['latency'] * 1e6:g} us per collective",
        f"batch     micro {b['micro_batch']} x accum {b['grad_accum']} x "
        + (f"{b['data_parallel']} data-parallel ({c['gpus']} GPUs / sequence_parallel {b['sequence_parallel']}: "
           f"{b['seq_len'] // b['sequence_parallel']:,} positions of each sequence per GPU)"
           if b["sequence_parallel"] > 1 else f"{c['gpus']} GPUs")
        + f" = {b['global_batch']} sequences = {b['tokens_per_step']:,} tokens per step",
    ]


def format_plan(p: dict) -> str:
    c, z, mem, tr, st, comm = p["cluster"], p["zero"], p["memory"], p["training"], p["step"], p["communication"]
    plain, ckpt = mem["plain"], mem["checkpointed"]
    rows = [
        ("model states (DeepSpeed estimate)", _gib(mem["model_states_gpu"]), _gib(mem["model_states_gpu"])),
        ("ZeRO buffers (buckets, hpZ copy)", _gib(mem["zero_buffers"]), _gib(mem["zero_buffers"])),
        ("activations saved for backward", _gib(plain["activations_saved"]), _gib(ckpt["activations_saved"])),
        ("activations at peak", _gib(plain["activations_peak"]), _gib(ckpt["activations_peak"])),
        ("total", _gib(plain["total"]), _gib(ckpt["total"])),
        (f"usable ({c['gpu_memory_gib']} GiB less {mem['margin']:.0%})", _gib(mem["usable"]), _gib(mem["usable"])),
        ("fits", "yes" if plain["fits"] else "NO", "yes" if ckpt["fits"] else "NO"),
        ("largest micro-batch that fits", str(plain["max_micro_batch"]), str(ckpt["max_micro_batch"])),
    ]
    in_config = "checkpointed" if mem["checkpointing_in_config"] else "plain"
    overlap = "on" if z["overlap_comm"] else "off"
    lines = _header(p) + [
        f"zero      {_zero_name(p)}, overlap_comm {overlap}, reduce bucket {z['reduce_bucket']:,.0f}"
        + (f", prefetch bucket {z['prefetch_bucket']:,.0f}, persistence threshold {z['persistence_threshold']:,.0f}, "
           f"{p['params']['fetch_units']} fetch units per pass" if c["zero"] == 3 else ""),
        "",
        f"memory per GPU (GiB)                {'plain':>10} {'checkpointed':>13}   (the config: {in_config})",
        *(f"  {label:33} {a:>10} {b_:>13}" for label, a, b_ in rows),
        f"host memory per node (DeepSpeed estimate): {_gib(mem['model_states_cpu_per_node'])} GiB",
        "",
        f"{'communication per GPU (each call)':57} {'when':>22} {'x/step':>7} {'NVLink GB':>10} {'IB GB':>8} {'PCIe GB':>8} {'ms':>8}",
        *(f"  {r['name']:55.55} {r['when']:>22} {r['per_step']:>7} {_gb(r['nvlink_bytes']):>10} {_gb(r['ib_bytes']):>8} "
          f"{_gb(r['pcie_bytes']):>8} {r['seconds'] * 1e3:>8.2f}" for r in comm["collectives"]),
        f"  {'per optimizer step':55} {'':>22} {'':>7} {_gb(comm['nvlink_bytes_per_step']):>10} "
        f"{_gb(comm['ib_bytes_per_step']):>8} {_gb(comm['pcie_bytes_per_step']):>8}",
        "",
        f"step      {st['compute_seconds']:.3g} s compute at {c['mfu']:.0%} of {c['peak_flops'] / 1e12:g} TFLOP/s + "
        f"{st['exposed_communication_seconds']:.3g} s exposed communication = {st['seconds']:.3g} s "
        f"({st['mfu']:.1%} MFU, {tr['tokens_per_second']:,.0f} tokens/s)",
        f"time      {tr['tokens'] / 1e9:g}B tokens = {tr['steps']:,} steps: {_duration(tr['seconds'])}",
        f"          (the config's train.steps={tr['config_steps']:,} covers {tr['config_tokens'] / 1e9:.2f}B tokens)",
    ]
    lines += [f"note      {n}" for n in p["notes"]]
    return "\n".join(lines)


def format_plans(plans: list[dict]) -> str:
    """Several ZeRO stages of one config side by side."""
    if len(plans) == 1:
        return format_plan(plans[0])
    rows = [
        ("memory per GPU, plain (GiB)", lambda p: _gib(p["memory"]["plain"]["total"])),
        ("memory per GPU, checkpointed (GiB)", lambda p: _gib(p["memory"]["checkpointed"]["total"])),
        ("fits plain / checkpointed", lambda p: f"{'yes' if p['memory']['plain']['fits'] else 'NO'} / "
                                                f"{'yes' if p['memory']['checkpointed']['fits'] else 'NO'}"),
        ("NVLink GB per GPU and step", lambda p: _gb(p["communication"]["nvlink_bytes_per_step"])),
        ("InfiniBand GB per GPU and step", lambda p: _gb(p["communication"]["ib_bytes_per_step"])),
        ("PCIe GB per GPU and step", lambda p: _gb(p["communication"]["pcie_bytes_per_step"])),
        ("exposed communication (s/step)", lambda p: f"{p['step']['exposed_communication_seconds']:.3g}"),
        ("step time (s)", lambda p: f"{p['step']['seconds']:.3g}"),
        ("MFU", lambda p: f"{p['step']['mfu']:.1%}"),
        ("training time", lambda p: _duration(p["training"]["seconds"])),
    ]
    width = max(24, *(len(_zero_name(p)) + 2 for p in plans))
    lines = _header(plans[0]) + ["", f"{'':36}" + "".join(f"{_zero_name(p):>{width}}" for p in plans)]
    lines += [f"  {label:34}" + "".join(f"{value(p):>{width}}" for p in plans) for label, value in rows]
    lines += [f"note      {n}" for n in dict.fromkeys(n for p in plans for n in p["notes"])]
    return "\n".join(lines)


def stages(text: str) -> list[int]:
    """--zero 3 or --zero 1,2,3."""
    import argparse

    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected stages like 3 or 1,2,3, got '{text}'") from None


def read_ds_config(cfg, path: str, gpus: int) -> dict:
    """A DeepSpeed JSON checked as training would check it (its batch against the config on `gpus`
    ranks, DeepSpeed's own parser), resolved with our settings filled in."""
    planned = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ds_config=path, precision="bf16"))
    with _quiet_deepspeed():
        from .train.engine import resolve_ds_config

        return resolve_ds_config(planned, gpus)


def _run(a) -> None:
    from .config import load_config

    cfg = load_config(a.config, a.overrides)
    gpus = a.gpus_per_node * max(1, a.nodes)
    ds = read_ds_config(cfg, a.ds_config, gpus) if a.ds_config else None
    links = {"nvlink": a.nvlink_gbs and a.nvlink_gbs * 1e9, "ib": a.ib_gbs * 1e9, "pcie": a.pcie_gbs and a.pcie_gbs * 1e9,
             "latency": a.latency_us * 1e-6}
    plans = [plan(cfg, a.gpus_per_node, a.nodes, a.gpu, zero, a.offload, a.tokens, a.mfu, a.micro_batch, a.seq_len,
                  ds, **links) for zero in (a.zero or [None])]
    if a.json:
        print(json.dumps(plans[0] if len(plans) == 1 else plans, indent=1))
    else:
        print(format_plans(plans))


def add_commands(commands) -> None:
    from .arguments import config_args, number, positive_number

    p = commands.add_parser("plan", help="memory per GPU, communication and training time of a config on a GPU cluster")
    config_args(p)
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node, e.g. 8")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpu", default="h200", help=f"GPU type: {', '.join(GPUS)} (default h200)")
    p.add_argument("--zero", type=stages, default=None,
                   help="ZeRO stage 1, 2 or 3, or several side by side (1,2,3); default: the --ds-config's, else 3")
    p.add_argument("--ds-config", default=None, metavar="FILE",
                   help="a DeepSpeed JSON whose knobs to plan with (offload, buckets, ZeRO++ hpZ/qwZ/qgZ); "
                        "checked as training checks it. Default: DeepSpeed's defaults for the stage")
    p.add_argument("--offload", action="store_true", help="offload the optimizer (ZeRO-3: and the parameters) to CPU")
    p.add_argument("--tokens", type=positive_number, default=20e9, help="training token budget (default 20e9)")
    p.add_argument("--mfu", type=number, default=0.4,
                   help="share of the peak FLOP/s the compute reaches (default 0.4); communication that overlap "
                        "cannot hide comes on top")
    p.add_argument("--nvlink-gbs", type=positive_number, default=None,
                   help="NVLink GB/s per GPU and direction (default: the GPU's, e.g. 450 for H200)")
    p.add_argument("--ib-gbs", type=positive_number, default=IB / 1e9,
                   help=f"InfiniBand GB/s per GPU (default {IB / 1e9:g}: one 400 Gb/s port per GPU)")
    p.add_argument("--pcie-gbs", type=positive_number, default=None, help="PCIe GB/s per GPU (default: the GPU's, 64 for Gen5)")
    p.add_argument("--latency-us", type=number, default=LATENCY * 1e6, help="microseconds per collective call added to its transfer time "
                   "(default 0: a bandwidth model; ~20 shows what small buckets cost)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per micro-step (default: train.micro_batch)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.seq_len)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (a list of plans for several stages)")
    p.set_defaults(run=_run)

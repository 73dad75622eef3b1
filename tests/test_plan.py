"""The cluster planner: its numbers against hand computation (tiny and paper-2048x24), and its
activation-memory formula against memory measured on the tiny model's training step on CPU."""

import json
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from topk_ds.cli import main
from topk_ds.config import load_config
from topk_ds.errors import UserError
from topk_ds.model import Transformer
from topk_ds.plan import activation_bytes, largest_layer_params, plan


def tiny_plan(**kw):
    return plan(load_config("tiny", ["model.vocab_size=512"]), 8, **kw)


def test_tiny_by_hand():
    # D=64 F=128 L=4 H=4 (head_dim 16) V=512, seq 64, micro-batch 8, k=8 on blocks 0-1
    p = tiny_plan()
    block = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # 41,088
    assert p["params"]["total"] == 4 * block + 2 * 512 * 64 + 64 == 229_952
    assert p["params"]["non_embedding"] == 229_952 - 512 * 64
    matmul = 4 * (4 * 64 * 64 + 3 * 64 * 128) + 512 * 64
    assert p["flops_per_token"] == 3 * (2 * matmul + 4 * 4 * 64 * 64) == 1_376_256
    # ZeRO-3 on 8 GPUs: 4 bytes x the largest layer (the embedding, 512 x 64) + 18 bytes x params / 8
    assert p["params"]["largest_layer"] == 32_768
    assert p["memory"]["model_states_gpu"] == 4 * 32_768 + 18 * 229_952 // 8 == 648_464
    # bf16 bytes per token: norm 4*64 + 4 + 2*2*64 = 516; attention 2*(12+8+4)*16 + 4*4 = 784;
    # SwiGLU 4*2*128 = 1024; dense block 2*516 + 784 + 1024 = 2840; TopK block + 3*8 + 64 (relu mask
    # while annealing) = 2928; head 516 + 4*512 = 2564. N = 8 * 64 = 512 tokens.
    plain, ckpt = p["memory"]["plain"], p["memory"]["checkpointed"]
    assert plain["activations_saved"] == 512 * (2 * 2928 + 2 * 2840 + 2564) == 7_219_200
    assert plain["activations_peak"] == 7_219_200 + 8 * 512 * 512
    assert ckpt["activations_saved"] == 512 * (4 * 2 * 64 + 2564) == 1_574_912
    assert ckpt["activations_peak"] == 1_574_912 + 8 * 512 * 512  # the loss, not a block recompute
    assert p["batch"]["tokens_per_step"] == 8 * 1 * 8 * 64
    assert p["training"]["seconds"] == pytest.approx(20e9 * 1_376_256 / (8 * 989e12 * 0.4))


def test_tiny_other_zero_stages_by_hand():
    P = 229_952
    assert tiny_plan(zero=2)["memory"]["model_states_gpu"] == 2 * P + 18 * P // 8
    assert tiny_plan(zero=1)["memory"]["model_states_gpu"] == 2 * P + 18 * P // 8 + 2 * P - 2 * P // 8
    offloaded = tiny_plan(zero=3, offload=True)["memory"]
    assert offloaded["model_states_gpu"] == 4 * 32_768
    assert offloaded["model_states_cpu_per_node"] == int(P * 18 * 1.5)


def test_paper_2048x24_by_hand():
    # D=2048 F=5632 L=24 H=16 (head_dim 128), V=32,000 assumed, seq 1024, micro-batch 16, k=64 on 22 blocks
    p = plan(load_config("paper-2048x24"), 8)
    block = 4 * 2048**2 + 3 * 2048 * 5632 + 2 * 2048  # 51,384,320
    assert p["params"]["total"] == 24 * block + 2 * 32000 * 2048 + 2048 == 1_364_297_728
    matmul = 24 * (4 * 2048**2 + 3 * 2048 * 5632) + 32000 * 2048
    assert p["flops_per_token"] == 3 * (2 * matmul + 4 * 24 * 1024 * 2048) == 8_395_948_032
    assert p["memory"]["model_states_gpu"] == 4 * 65_536_000 + 18 * 1_364_297_728 // 8 == 3_331_813_888
    # bf16 bytes per token: norm 4*2048 + 4 + 4*2048 = 16,388; attention 2*(48+32+16)*128 + 4*16 = 24,640;
    # SwiGLU 8*5632 = 45,056; dense block 102,472; TopK block + 3*64 + 2048 = 104,712; head 16,388 + 128,000
    N = 16 * 1024
    plain, ckpt = p["memory"]["plain"], p["memory"]["checkpointed"]
    assert plain["activations_saved"] == N * (22 * 104_712 + 2 * 102_472 + 144_388) == 43_466_686_464
    assert plain["activations_peak"] == 43_466_686_464 + 8 * N * 32000
    assert ckpt["activations_saved"] == N * (24 * 2 * 2048 + 144_388)
    assert plain["fits"] and ckpt["fits"]  # about 48 GiB of 141
    assert p["training"]["seconds"] / 3600 == pytest.approx(14.74, abs=0.01)


def test_largest_layer_is_deepspeeds():
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = load_config("tiny", ["model.vocab_size=512"]).model
    assert model_to_params(Transformer(cfg)) == (cfg.num_params(), largest_layer_params(cfg))


def measured_config(vocab: int):
    """dim 128, 4 layers, ffn 344, k 16: the paper's proportions at CPU size."""
    return load_config("tiny", ["model.dim=128", "model.ffn_dim=344", f"model.vocab_size={vocab}", "topk.k=16"])


def measure(cfg, batch: int, seq: int, checkpointing: bool, alpha: float) -> dict:
    """One fp32 training step of the model on CPU. `saved`: bytes the CPU allocator still holds
    when backward starts (everything kept for it: saved tensors, checkpointed block inputs, the
    loss); `peak`: the most it held during forward + backward. Both relative to the start, read
    from the profiler's allocation events, so parameters and the gradient buffers (made by a
    warm-up step and accumulated into in place) are not counted."""
    model = Transformer(cfg.model, cfg.topk).train()
    model.set_alpha(alpha)
    model.activation_checkpointing = checkpointing
    tokens, targets = torch.randint(0, cfg.model.vocab_size, (2, batch, seq))
    model(tokens, targets).backward()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(tokens, targets)
        with record_function("backward"):
            loss.backward()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.name == "backward":
            backward_start = event.start_time_ns
        if event.tag == torch._C._profiler._EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    held = peak = 0
    saved = None
    for time, size in sorted(allocations):
        if saved is None and time >= backward_start:
            saved = held
        held += size
        peak = max(peak, held)
    return {"saved": saved, "peak": peak}


@pytest.mark.parametrize("vocab", [4096, 256])  # head-dominated (the paper's V/D) and block-dominated
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_measured_memory(vocab, checkpointing):
    cfg = measured_config(vocab)
    measured = measure(cfg, 4, 256, checkpointing, alpha=0.5)
    estimate = activation_bytes(cfg, 4, 256, dtype_bytes=4, checkpointing=checkpointing, annealing=True)
    for key in ("saved", "peak"):
        assert estimate[key] == pytest.approx(measured[key], rel=0.10), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_saved_tensors_match_formula(dtype, alpha):
    """Bytes autograd saves during one training forward, counted by saved_tensors_hooks: every
    saved tensor's storage once (views share it), parameters left out. bf16 checks the fp32 norm
    copies and the fp32 log-softmax."""
    cfg = measured_config(4096)
    model = Transformer(cfg.model, cfg.topk).to(dtype).train()
    model.set_alpha(alpha)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    tokens, targets = torch.randint(0, 4096, (2, 4, 256))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, targets)
    estimate = activation_bytes(cfg, 4, 256, dtype_bytes=dtype.itemsize, annealing=alpha > 0)["saved"]
    assert estimate == pytest.approx(sum(storages.values()), rel=0.01)


def test_cli_text(capsys):
    main(["plan", "--config", "paper-1024x8", "--gpus-per-node", "8", "--gpu", "H100", "--zero", "2"])
    text = capsys.readouterr().out
    assert "ZeRO-2" in text and "fits" in text and "steps" in text


def test_cli_json_is_clean_on_first_deepspeed_import():
    """A fresh process: DeepSpeed logs to stdout when it is imported on a machine without GPUs."""
    out = subprocess.run([sys.executable, "-m", "topk_ds.cli", "plan", "--config", "tiny", "--set", "model.vocab_size=512",
                          "--gpus-per-node", "4", "--nodes", "2", "--micro-batch", "2", "--seq-len", "32", "--json"],
                         capture_output=True, text=True, check=True).stdout
    p = json.loads(out)
    assert p["cluster"]["gpus"] == 8 and p["batch"]["tokens_per_step"] == 2 * 8 * 32


@pytest.mark.parametrize("args, message", [
    (["--gpu", "v100"], "--gpu v100 is not known"),
    (["--nodes", "0"], "--nodes 0 must be >= 1"),
    (["--zero", "4"], "--zero 4 must be 1, 2 or 3"),
    (["--mfu", "0"], "--mfu 0 must be in (0, 1]"),
    (["--seq-len", "4096"], "--seq-len 4096 must be in [1, model.max_seq_len=256]"),
])
def test_bad_input_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", "tiny", "--gpus-per-node", "8", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError):
        plan(load_config("tiny"), 0)


# The communication model. tiny: D=64 F=128 L=4 V=512, P = 229,952 parameters, micro-batch 8 x seq 64,
# grad_accum 1. With a persistence threshold of 0 every tensor is partitioned and every module with
# parameters is one fetch unit: 7 per block (2 norms, wqkv, wo, w1, w2, w3) + embedding, final norm, head.
P, UNITS = 229_952, 4 * 7 + 3
ALL_PARTITIONED = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False,
                                         "reduce_bucket_size": 100_000}}
SLOW_LINKS = {"nvlink": 1e9, "ib": 1e8, "latency": 0.0}  # round numbers for hand computation


def by_name(p):
    return {r["name"].split(" (")[0]: r for r in p["communication"]["collectives"]}


def test_zero3_bytes_per_step_by_hand():
    # 2 nodes x 4 GPUs: a collective over S bytes moves S (g-1)/g = 3/4 S over NVLink and S (n-1)/(n g)
    # = 1/8 S over InfiniBand per GPU (hierarchical; together a ring's S (N-1)/N = 7/8 S)
    p = plan(load_config("tiny", ["model.vocab_size=512"]), 4, nodes=2, ds_config=ALL_PARTITIONED, **SLOW_LINKS)
    assert p["params"]["partitioned"] == P and p["params"]["fetch_units"] == UNITS
    rows = by_name(p)
    S = 2 * P  # bf16
    for name in ("parameter all-gather, forward", "parameter all-gather, backward", "gradient reduce-scatter"):
        assert rows[name]["nvlink_bytes"] == 3 / 4 * S and rows[name]["ib_bytes"] == S / 8
        assert rows[name]["seconds"] == pytest.approx(3 / 4 * S / 1e9 + S / 8 / 1e8)
    assert rows["parameter all-gather, forward"]["calls"] == UNITS
    assert rows["gradient reduce-scatter"]["calls"] == 3  # ceil(229,952 / 100,000)
    comm = p["communication"]
    assert comm["nvlink_bytes_per_step"] == pytest.approx(3 * 3 / 4 * S)
    assert comm["ib_bytes_per_step"] == pytest.approx(3 * S / 8) and comm["pcie_bytes_per_step"] == 0
    # overlap_comm off: every byte is exposed on top of the compute
    compute = 8 * 64 * 1_376_256 / (989e12 * 0.4)
    assert p["step"]["seconds"] == pytest.approx(compute + 3 * (3 / 4 * S / 1e9 + S / 8 / 1e8))
    assert p["training"]["seconds"] == pytest.approx(20e9 / (8 * 8 * 64) * p["step"]["seconds"])


def test_zero_plus_plus_and_overlap_by_hand():
    zpp = {"zero_optimization": {**ALL_PARTITIONED["zero_optimization"], "zero_hpz_partition_size": 4,
                                 "zero_quantized_weights": True, "zero_quantized_gradients": True}}
    p = plan(load_config("tiny", ["model.vocab_size=512"]), 4, nodes=2, ds_config=zpp, **SLOW_LINKS)
    rows = by_name(p)
    assert rows["parameter all-gather, forward"]["ib_bytes"] == P / 8  # qwZ: int8
    assert rows["parameter all-gather, backward"]["nvlink_bytes"] == 3 / 4 * P  # hpZ: within the node, int8
    assert rows["parameter all-gather, backward"]["ib_bytes"] == 0
    assert rows["gradient reduce-scatter"]["ib_bytes"] == 0.5 * P / 8  # qgZ: int4
    assert p["memory"]["zero_buffers"] == 2 * 100_000 + 2 * P + P // 4  # reduce bucket, prefetch (the model), hpZ copy
    # with overlap the collectives hide behind a long enough compute; without a long one only the excess shows
    hidden = plan(load_config("tiny", ["model.vocab_size=512"]), 4, nodes=2, mfu=1e-6,
                  ds_config={"zero_optimization": {**zpp["zero_optimization"], "overlap_comm": True}}, **SLOW_LINKS)
    assert hidden["step"]["exposed_communication_seconds"] == 0
    shown = plan(load_config("tiny", ["model.vocab_size=512"]), 4, nodes=2,
                 ds_config={"zero_optimization": {**zpp["zero_optimization"], "overlap_comm": True}}, **SLOW_LINKS)
    compute, rows = shown["step"]["compute_seconds"], by_name(shown)
    forward = rows["parameter all-gather, forward"]["seconds"]
    backward = rows["parameter all-gather, backward"]["seconds"] + rows["gradient reduce-scatter"]["seconds"]
    assert shown["step"]["exposed_communication_seconds"] == pytest.approx(
        max(0, forward - compute / 3) + max(0, backward - 2 * compute / 3))


def test_zero2_and_offload_bytes_by_hand():
    cfg = load_config("tiny", ["model.vocab_size=512", "train.grad_accum=2"])
    p = plan(cfg, 4, nodes=2, zero=2, **SLOW_LINKS)
    rows, S = by_name(p), 2 * P
    assert rows["gradient reduce-scatter"]["per_step"] == 2  # every micro-step
    assert rows["parameter all-gather after the optimizer step"]["per_step"] == 1
    assert p["communication"]["nvlink_bytes_per_step"] == pytest.approx(3 * 3 / 4 * S)
    assert p["zero"]["overlap_comm"] is False  # DeepSpeed's default below stage 3
    offloaded = plan(cfg, 4, nodes=2, zero=3, offload=True, ds_config=ALL_PARTITIONED, **SLOW_LINKS)
    host = {r["name"]: r for r in offloaded["communication"]["collectives"] if r["pcie_bytes"]}
    assert offloaded["communication"]["pcie_bytes_per_step"] == pytest.approx(
        2 * (2 * 2 * P / 8) + 2 * (4 * P / 8) + 2 * P / 8)  # shards in per pass, fp32 grads out, params back
    assert len(host) == 3


def test_module_granularity_threshold_fetch_units():
    from topk_ds.plan import fetch_units

    for preset, threshold, units in (("paper-2048x24", 0, 24 * 5 + 2), ("paper-2048x24", 6e6, 24 + 2),
                                     ("paper-1024x8", 6e6, 1)):
        m = load_config(preset, ["model.vocab_size=32000"]).model
        with torch.device("meta"):
            model = Transformer(m, load_config(preset).topk)
        assert fetch_units(model, 100_000, threshold) == units, (preset, threshold)


def test_fetch_unit_granularity_is_deepspeeds():
    """Our restatement of DeepSpeed's granularity rule against its own (private) computation."""
    import sys
    from types import SimpleNamespace

    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    from topk_ds.plan import fetch_units

    model = Transformer(load_config("tiny", ["model.vocab_size=512"]).model, load_config("tiny").topk)
    for p in model.parameters():
        p.ds_numel = p.numel()
    ds = SimpleNamespace(min_granularity_value=sys.maxsize, min_granularity_layer=None, granularity_info=set())
    ds._get_granularity_recursively = lambda m: DeepSpeedZeRoOffload._get_granularity_recursively(ds, m)
    DeepSpeedZeRoOffload._get_granularity_recursively(ds, model)
    block = model.layers[0].ds_model_granularity
    assert fetch_units(model, 0, block) == 4 + 3 and fetch_units(model, 0, block - 1) == UNITS


def test_cli_stages_side_by_side_and_ds_config(capsys):
    main(["plan", "--config", "paper-2048x24", "--gpus-per-node", "8", "--nodes", "4", "--zero", "1,2,3",
          "--ds-config", "ds_configs/zero3_2048x24_zeropp.json"])
    text = capsys.readouterr().out
    assert "ZeRO-1" in text and "ZeRO-2" in text and "ZeRO-3 (hpZ 8, qwZ, qgZ)" in text
    assert "global batch (micro x accum x GPUs) changes with the GPU count: 2,048 sequences here, 512 with the " \
           "config on 8 GPUs" in text and "train.grad_accum=1" in text
    main(["plan", "--config", "paper-2048x24", "--gpus-per-node", "8", "--ds-config", "ds_configs/zero3_offload.json",
          "--json"])
    p = json.loads(capsys.readouterr().out)
    assert p["zero"]["offload_optimizer"] and p["zero"]["offload_params"] and p["communication"]["pcie_bytes_per_step"] > 0


@pytest.mark.parametrize("args, message", [
    (["--tokens", "inf"], "argument --tokens: expected a finite number, got 'inf'"),
    (["--tokens", "nan"], "argument --tokens: expected a finite number, got 'nan'"),
    (["--zero", "1,x"], "expected stages like 3 or 1,2,3"),
    (["--ds-config", "ds_configs/zero3_2048x24_zeropp.json", "--gpus-per-node", "4"],
     "zero_hpz_partition_size=8 exceeds the 4 GPUs"),
    (["--ds-config", "ds_configs/zero3_2048x24.json", "--set", "model.vocab_size=512"],
     "--ds-config: stage3_module_granularity_threshold=6,000,000 makes the whole model one fetch unit"),
])
def test_more_bad_input_is_one_line(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", "tiny", "--gpus-per-node", "8", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1

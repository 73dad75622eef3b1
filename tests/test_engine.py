"""The DeepSpeed seam's GPU-readiness: the DeepSpeed JSON checked by DeepSpeed's own parser, the
optimizer choice, activation checkpointing under ZeRO-3 on two ranks, per-block compilation, and the
TopK health counters that stay on the device."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from topk_ds.config import load_config
from topk_ds.errors import UserError
from topk_ds.model import ModelConfig, TopKConfig, Transformer
from topk_ds.train.engine import adamw, resolve_ds_config
from topk_ds.train.health import TopKHealth

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(*overrides):
    return load_config("tiny", ["model.vocab_size=128", *overrides])


@pytest.mark.parametrize("name", ["cpu.json", "zero2_bf16.json", "zero3_bf16.json", "zero3_offload.json",
                                  "zero3_1024x8.json", "zero3_2048x24.json", "zero3_2048x24_zeropp.json"])
def test_shipped_ds_configs_pass_deepspeeds_parser(name):
    ds = resolve_ds_config(tiny_cfg(f"train.ds_config=ds_configs/{name}"), world_size=1)
    assert ds["train_batch_size"] == 8


@pytest.mark.parametrize("content, message", [
    ([{"zero_optimization": {"stage": 2}}], "must hold a JSON object of DeepSpeed settings, not a list"),
    ({"zero_optimization": {"stage": 7}}, "DeepSpeed 0.19.8 rejects zero_optimization.stage=7 (DeepSpeedZeroConfig): Input should be 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket": 5}}, "rejects zero_optimization.stage3_prefetch_bucket=5"),
    ({"zero_optimisation": {"stage": 2}}, "'zero_optimisation' is not a DeepSpeed 0.19.8 setting; did you mean 'zero_optimization'?"),
    ({"zero_optimization": []}, "DeepSpeed 0.19.8 rejects it"),
])
def test_bad_ds_json_is_one_line(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError) as e:
        resolve_ds_config(tiny_cfg(f"train.ds_config={path}"), world_size=1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_ds_json_stops_train_before_anything_is_written(synthetic_data, tmp_path):
    from conftest import run_cli

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    proc = run_cli("train", "--config", "tiny", "--set", f"data.path={synthetic_data[1]}", "--set",
                   f"train.out_dir={tmp_path / 'run'}", "--set", f"train.ds_config={path}", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "zero_optimization.stage=7" in proc.stderr and not (tmp_path / "run").exists()


def test_optimizer_is_torch_adamw_unless_offloaded_or_fusedadam_prebuilt(monkeypatch):
    import topk_ds.train.engine as engine

    cfg = tiny_cfg()
    offloaded = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    torch_adam = {"torch_adam": True, "fused": True}
    assert adamw(cfg, {}, "cpu")["params"].items() >= torch_adam.items()
    assert adamw(cfg, {}, "cuda")["params"].items() >= torch_adam.items()  # FusedAdam would need nvcc
    assert "torch_adam" not in adamw(cfg, offloaded, "cuda")["params"]  # DeepSpeed's CPU Adam
    monkeypatch.setattr(engine, "fused_adam_prebuilt", lambda: True)
    assert "torch_adam" not in adamw(cfg, {}, "cuda")["params"]  # DeepSpeed's FusedAdam, built already
    assert adamw(cfg, {}, "cuda")["params"]["betas"] == [0.9, 0.95]


@pytest.mark.slow
def test_activation_checkpointing_under_zero3_on_two_ranks_gives_the_same_losses():
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", "29655",
                           str(REPO / "tests/scripts/zero3_checkpointing.py")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"plain"')))
    assert len(result["plain"]) == 3 and result["plain"] == result["checkpointed"]


def tiny_model():
    return Transformer(ModelConfig(dim=32, n_layers=3, n_heads=2, ffn_dim=48, vocab_size=50, max_seq_len=32),
                       TopKConfig(k=4, n_nontopk=1)).train()


def test_health_counts_on_the_device_and_once_per_step():
    model = tiny_model()
    health = TopKHealth(model, window=2)
    seen = {0: [], 1: []}
    for i, site in enumerate(model.sites()[:2]):
        site.register_forward_hook(lambda m, args, out, i=i: seen[i].append(out.detach().flatten(0, -2)))
    tokens = torch.randint(0, 50, (2, 3, 16))
    for batch in tokens:
        model(batch)
    model.eval()
    model(tokens[0])  # evaluation forwards are not counted
    step1 = health.collect(1)
    for i in (0, 1):
        outs = torch.cat(seen[i][:2])
        assert step1[f"topk/l0/layer{i}"] == pytest.approx((outs != 0).sum().item() / outs.shape[0])
    assert "topk/dead/layer0" not in step1 and "topk/l0/layer2" not in step1
    model.train()
    model(tokens[0])
    step2 = health.collect(2)  # the end of a window: the share of neurons that never fired in it
    fired = torch.cat(seen[0][:2] + seen[0][3:]).ne(0).any(0)
    assert step2["topk/dead/layer0"] == pytest.approx(1.0 - fired.float().mean().item())
    assert health.counts.sum() == 0 and not health.fired.any()  # counters reset


def test_compiled_blocks_with_health_hooks_and_checkpointing_match_eager():
    """train.compile: each block compiled in place (names unchanged, so checkpoints and exports do not
    change), the health hooks traced inside it, activation checkpointing around it."""
    eager, compiled = tiny_model(), tiny_model()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(backend="aot_eager", fullgraph=True)
    healths = [TopKHealth(m, window=1) for m in (eager, compiled)]
    tokens = torch.randint(0, 50, (2, 16))
    for checkpointing in (False, True):
        for m in (eager, compiled):
            m.activation_checkpointing = checkpointing
            m.set_alpha(0.5)
            m.zero_grad()
            m(tokens, tokens).backward()
        for a, b in zip(eager.parameters(), compiled.parameters()):
            assert torch.equal(a.grad, b.grad)
        assert healths[0].collect(1) == healths[1].collect(1)
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_prefetch_reads_ahead_on_a_thread_and_resumes_exactly(prepared_data):
    import threading

    from topk_ds.data.dataset import GlobalSampler, TokenWindows
    from topk_ds.train.prefetch import Prefetcher

    data = TokenWindows(prepared_data, seq_len=16)
    readers = set()

    def read(indices):
        readers.add(threading.current_thread().name)
        return data.batch(indices)

    def steps(sampler, n):
        with Prefetcher(read, lambda: sampler.next_step(1, 2, 2), sampler.state_dict) as prefetch:
            return [prefetch.next_step() for _ in range(n)]

    direct = GlobalSampler(len(data), 8, seed=3)
    expected = []
    for _ in range(len(data) // 8 + 3):  # into the second epoch
        expected.append(([data.batch(i) for i in direct.next_step(1, 2, 2)], direct.state_dict()))
    got = steps(GlobalSampler(len(data), 8, seed=3), len(expected))
    for (batches, state), (want, want_state) in zip(got, expected):
        assert state == want_state and all(torch.equal(a, b) for a, b in zip(batches, want))
    assert readers and "MainThread" not in readers
    # a checkpoint records the state that came with a step; a sampler restored from it continues exactly
    resumed = GlobalSampler(len(data), 8, seed=3)
    resumed.load_state_dict(got[4][1])
    for (batches, state), (want, want_state) in zip(steps(resumed, 3), expected[5:]):
        assert state == want_state and all(torch.equal(a, b) for a, b in zip(batches, want))


def test_prefetch_read_errors_surface_on_the_training_thread():
    from topk_ds.train.prefetch import Prefetcher

    def read(indices):
        raise OSError("shard vanished")

    with Prefetcher(read, lambda: [[0]], dict) as prefetch, pytest.raises(OSError, match="shard vanished"):
        prefetch.next_step()


def test_a_granularity_threshold_that_makes_the_whole_model_one_unit_is_refused():
    """DeepSpeed 0.19.8 fails in backward when the whole model is one ZeRO-3 fetch unit (measured on
    the tiny model: threshold 5300 > its granularity 5226 fails, 4200 >= a block's 4108 trains)."""
    from topk_ds.train.engine import check_granularity

    cfg = tiny_cfg("model.vocab_size=512")

    def zero3(threshold):
        return {"zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": threshold}}
    check_granularity(cfg, zero3(4200), "ds.json")
    with pytest.raises(UserError, match=r"ds.json: stage3_module_granularity_threshold=5,300 makes the whole model one "
                                        r"fetch unit \(its granularity is 5,226\).*from 4,108 up, each block is one unit"):
        check_granularity(cfg, zero3(5300), "ds.json")

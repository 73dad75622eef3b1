"""Evaluation and analysis where the models live (--device/--dtype, where tensors go, bf16 against fp32),
memory stated and refused up front, loading without a second copy of the weights, data-parallel statistics
on 2 CPU ranks, tracing and evaluation over several models, and the analysis's bad values (one line each)."""

import json
import os
import shutil
import subprocess
import sys
import weakref
from dataclasses import fields

import pytest
import torch

from conftest import RUN_SAVE_EVERY, RUN_STEPS, assert_one_error, cli_main

STATS_TOKENS = 4096


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """Two fake GPUs of the given compute capability (nothing is put on them)."""
    def make(capability=(9, 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return make


# --- devices ---------------------------------------------------------------------------------------

def test_device_and_dtype_resolution(no_gpu, monkeypatch, two_gpus):
    from topk_ds.devices import resolve
    from topk_ds.errors import UserError

    assert resolve("auto") == (torch.device("cpu"), torch.float32)
    assert resolve("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve("cuda")
    two_gpus()
    assert resolve("auto") == (torch.device("cuda", 0), torch.bfloat16)  # bf16 by default on a GPU
    assert resolve("cuda:1", "fp32") == (torch.device("cuda", 1), torch.float32)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under a launcher: this process's GPU
    assert resolve("auto")[0] == resolve("cuda")[0] == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"cuda:2: only 2 GPUs visible"):
        resolve("cuda:2")
    two_gpus((7, 0))
    with pytest.raises(UserError, match="no bfloat16"):
        resolve("cuda:0", "bf16")
    assert resolve("cuda:0", "fp32")[1] == torch.float32


def test_device_that_is_not_there_is_one_line_before_any_work(no_gpu, tiny_hf, tiny_run, synthetic_data, tmp_path,
                                                              capsys):
    out = tmp_path / "out"
    for argv in (["analyze", "stats", tiny_hf, "--data", synthetic_data[1], "--out", out],
                 ["analyze", "neuron", tiny_hf, "0:1", "--data", synthetic_data[1]],
                 ["analyze", "trace", tiny_run, "--entropy", "--out", out],
                 ["steer", tiny_hf, "--neuron", "0:1", "--offset", 2, "--out", out / "s.json"],
                 ["eval", tiny_hf, "--suite", "local", "--out", out],
                 ["sae", "train", tiny_hf, "--data", synthetic_data[1], "--out", out],
                 ["analyze", "compare", "--topk", tiny_hf, "--dense", tiny_hf, "--sae", out, "--data", synthetic_data[1],
                  "--out", out]):
        assert_one_error(cli_main(capsys, *argv, "--device", "cuda:1"), "--device cuda:1", "CUDA is not available")
        if argv[0] == "sae" or argv[1] == "compare":  # SAEs train in fp32 on the CPU
            assert_one_error(cli_main(capsys, *argv, "--device", "cpu", "--dtype", "bf16"), "fp32 on the CPU")
    assert_one_error(cli_main(capsys, "steer", tiny_hf, "--neuron", "0:1", "--offset", 2, "--device", "gpu"),
                     "--device", "auto, cpu, cuda or cuda:N")
    assert not out.exists()


def test_load_puts_every_weight_on_the_device_in_the_dtype(tiny_hf, tiny_run):
    """Where tensors live, without a GPU: the meta device takes every weight as a GPU would."""
    from topk_ds import load

    for path, tag in ((tiny_hf, None), (tiny_run, f"global_step{RUN_SAVE_EVERY}")):
        model, _ = load(path, tag=tag, device="meta", dtype="bf16")
        assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
        assert model.config.train_step == (RUN_STEPS if tag is None else RUN_SAVE_EVERY)


def test_steer_in_bf16_states_its_cost_and_writes_its_samples(tiny_hf, tmp_path, capsys):
    code, out, err = cli_main(capsys, "steer", tiny_hf, "--neuron", "0:1", "--offset", 2, "--samples", 1,
                              "--max-new-tokens", 4, "--device", "cpu", "--dtype", "bf16", "--out", tmp_path / "s.json")
    assert code == 0, err
    assert "steer needs" in err and "steer: 2 offsets x 1 samples of 4 new tokens:" in err and "FLOP" in err
    assert [len(r["texts"]) for r in json.loads((tmp_path / "s.json").read_text())["offsets"]] == [1, 1]


def test_load_reads_a_checkpoint_one_tensor_at_a_time(tiny_run, monkeypatch):
    """A ZeRO checkpoint is consolidated and cast tensor by tensor: in bf16, no fp32 tensor read earlier is
    still alive when the next is read; in fp32 the tensor read becomes the parameter itself (no copy). Here
    (ZeRO-2) the tensors are views of DeepSpeed's one merged fp32 vector; from ZeRO-3 shards each is
    gathered as it is read (DeepSpeed's lazy mode), so no whole fp32 copy is made besides the model."""
    import topk_ds.convert.hf_export as hf_export
    from topk_ds import load

    read = hf_export.read_weights
    produced = []

    class Watched:
        def __init__(self, lazy):
            self.lazy, self.shape = lazy, lazy.shape

        def contiguous(self):
            assert all(ref() is None for ref in produced), "an fp32 tensor read before is still held"
            tensor = self.lazy.contiguous()
            produced.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(hf_export, "read_weights", lambda source: {k: Watched(v) for k, v in read(source).items()})
    model, _ = load(tiny_run, dtype="bf16")
    assert len(produced) == len(model.state_dict()) and model.model.norm.weight.dtype == torch.bfloat16

    kept = {}

    class Kept(Watched):
        def contiguous(self):
            kept[id(self)] = self.lazy.contiguous()
            return kept[id(self)]

    monkeypatch.setattr(hf_export, "read_weights", lambda source: {k: Kept(v) for k, v in read(source).items()})
    model, _ = load(tiny_run, dtype="fp32")
    assert {t.data_ptr() for t in kept.values()} == {p.data_ptr() for p in model.parameters()}


def test_bf16_statistics_equal_fp32_within_tolerance(tiny_hf, synthetic_data):
    """The forward pass in bf16 (the GPU default), the statistics accumulated in fp32 as in an fp32 run: on
    the same tokens the counts are equal, the per-token sums within 2 % (relative L2, measured ~0.15 %),
    L0 within 1 %, the mean token entropy within 0.05 nats and the mean semantic entropy within 0.2 nats
    (measured 0.006 and 0.05: the set S moves where abar sits near its threshold). The fingerprint is the
    same, so statistics made in bf16 on a GPU serve the model loaded in fp32 on a CPU."""
    from topk_ds import load
    from topk_ds.analysis.data import token_batches
    from topk_ds.analysis.stats import collect, compute_entropy
    from topk_ds.analysis.units import Neurons

    runs = {}
    for dtype in ("fp32", "bf16"):
        model, tok = load(tiny_hf, dtype=dtype)
        batches = token_batches(synthetic_data[1], tok, model.config.vocab_size, 64, STATS_TOKENS, 16)
        runs[dtype] = collect(Neurons(model), tok, batches, STATS_TOKENS, progress=False)
        compute_entropy(runs[dtype], progress=False)
    full, half = runs["fp32"], runs["bf16"]
    assert full.meta["fingerprint"] == half.meta["fingerprint"] and torch.equal(full.counts, half.counts)
    for l, ls in full.layers.items():
        other, a, b = half.layers[l], full.summary(l), half.summary(l)
        assert ls.sums.dtype == other.sums.dtype == torch.float32
        assert (ls.sums - other.sums).norm() <= 0.02 * ls.sums.norm()
        assert abs(a["l0"] - b["l0"]) <= 0.01 * a["l0"]
        assert abs(a["token_entropy_mean"] - b["token_entropy_mean"]) <= 0.05
        assert abs(a["semantic_entropy_mean"] - b["semantic_entropy_mean"]) <= 0.2


# --- memory ----------------------------------------------------------------------------------------

def test_stats_states_its_memory_and_cost_and_refuses_what_does_not_fit(tiny_hf, synthetic_data, tmp_path, capsys,
                                                                        monkeypatch):
    """Both lines come before the model is loaded; a need above what is available stops the command there."""
    import topk_ds.convert.hf_export as hf_export
    import topk_ds.devices as devices
    from topk_ds.errors import UserError

    def stop(*args, **kwargs):
        raise UserError("the model would load here")

    monkeypatch.setattr(hf_export, "load", stop)
    out = tmp_path / "out"
    argv = ["analyze", "stats", tiny_hf, "--data", synthetic_data[1], "--out", out, "--tokens", 1000, "--seq-len", 64,
            "--device", "cpu"]
    assert_one_error(cli_main(capsys, *argv), "the model would load here")
    monkeypatch.setattr(devices, "available_memory", lambda device: 2**20)
    line = assert_one_error(cli_main(capsys, *argv), "analyze stats needs", "1 MiB available", "not enough", "--layers")
    assert "statistics" in line and "model" in line and not out.exists()


def test_stats_memory_grows_with_the_analysed_layers():
    """The paper's D=2048 L=24 model at V=32,000: 262 MB of sums and 8 MB of histograms and top contexts per
    layer, so --layers bounds the need."""
    import dataclasses

    from topk_ds.analysis.stats import memory_needs
    from topk_ds.config import preset

    m = dataclasses.replace(preset("paper-2048x24").model, vocab_size=32000)
    one, _ = memory_needs(m, m.dim, 1, 8192, 2)
    every, host = memory_needs(m, m.dim, 24, 8192, 2)
    assert one["statistics"] == 4 * 32000 * 2048 + 8 * 2048 * (1 + 64) + 2048 * 20 * (4 + 8 * 21)
    assert every["statistics"] == 24 * one["statistics"]
    assert host["entropy"] >= 32000**2 and one["model"] == 2 * m.num_params()


def test_analysis_bad_values_are_one_line(tiny_hf, tiny_run, synthetic_data, tmp_path, capsys):
    """Non-finite, zero and negative values, a window or a generation longer than the model's context, a figure
    that would not be a PNG."""
    steer = ["steer", tiny_hf, "--neuron", "0:1", "--out", tmp_path / "s.json", "--offset"]
    assert_one_error(cli_main(capsys, *steer, "nan"), "--offset", "finite")
    assert_one_error(cli_main(capsys, *steer, "inf"), "--offset", "finite")
    assert_one_error(cli_main(capsys, *steer, 2, "--max-new-tokens", 100000), "--max-new-tokens 100000",
                     "exceeds the model's context (max_seq_len 256)")
    assert_one_error(cli_main(capsys, "analyze", "entropy", tmp_path, "--threshold", "nan"), "--threshold", "finite")
    assert_one_error(cli_main(capsys, "analyze", "entropy", tmp_path, "--compare", tmp_path / "x.xyz"), "x.xyz", "PNG")
    for command in (["neuron", tmp_path, "0:1"], ["browse", tmp_path, "--out", tmp_path / "site"]):
        assert_one_error(cli_main(capsys, "analyze", *command, "--contexts", "-3"), "--contexts", ">= 0")
    for option in ("--seq-len", "--batch-tokens"):
        assert_one_error(cli_main(capsys, "analyze", "stats", tiny_hf, "--data", synthetic_data[1], "--out",
                                  tmp_path / "o", option, 0), option, ">= 1")
    assert_one_error(cli_main(capsys, "analyze", "stats", tiny_hf, "--data", synthetic_data[1], "--out", tmp_path / "o",
                              "--seq-len", 100000), "--seq-len 100000 exceeds the model's context", "<= 256")
    assert_one_error(cli_main(capsys, "analyze", "trace", tiny_run, "--entropy", "--seq-len", 100000, "--out",
                              tmp_path / "t"), "--seq-len 100000 exceeds")
    for written in ("s.json", "o", "t", "x.xyz", "site"):
        assert not (tmp_path / written).exists()


def test_truncated_statistics_are_one_line(stats_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(stats_dir, broken)
    tensors = broken / "tensors.safetensors"
    os.truncate(tensors, tensors.stat().st_size // 2)
    for argv in (["analyze", "neuron", broken, "0:1"], ["analyze", "entropy", broken],
                 ["analyze", "browse", broken, "--out", tmp_path / "site"]):
        assert_one_error(cli_main(capsys, *argv), str(broken), "incomplete or corrupt")
    assert not (tmp_path / "site").exists()


# --- data-parallel statistics ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_stats(tiny_hf, synthetic_data, tmp_path_factory):
    from topk_ds.cli import main

    out = tmp_path_factory.mktemp("scale") / "stats"
    main(["analyze", "stats", str(tiny_hf), "--data", str(synthetic_data[1]), "--tokens", str(STATS_TOKENS),
          "--seq-len", "64", "--out", str(out)])
    return out


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(tiny_hf, synthetic_data, small_stats, tmp_path):
    """`torchrun --nproc-per-node 2 -m topk_ds.analysis stats` over gloo: each rank runs every other batch,
    the sums are all-reduced and the top lists merged; counts and firing are bitwise those of one process,
    sums and what is computed from them within float tolerance (another summation order), the top values
    equal, and every top context and its activations equal where its value is not tied; only rank 0 writes."""
    from topk_ds.analysis.stats import Stats

    out = tmp_path / "two"
    args = ["stats", tiny_hf, "--data", synthetic_data[1], "--tokens", STATS_TOKENS, "--seq-len", 64, "--batch-tokens",
            512, "--out", out]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           "29653", "-m", "topk_ds.analysis", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote statistics") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["two"]
    one, two = Stats.load(small_stats), Stats.load(out)
    assert {k: v for k, v in one.meta.items() if k != "layers"} == {k: v for k, v in two.meta.items() if k != "layers"}
    assert torch.equal(one.counts, two.counts) and torch.equal(one.embedding, two.embedding)
    for l, a in one.layers.items():
        b = two.layers[l]
        v = a.top_values
        untied = ((v[:, :, None] == v[:, None, :]).sum(-1) == 1) & (v > v[:, -1:])
        assert (a.layer, a.k) == (b.layer, b.k)
        rules = {f.name: f.metadata.get("merge") for f in fields(a)}
        for name, x in a.tensors().items():
            y = b.tensors()[name]
            if rules[name] == "top" and name != "top_values":  # other slots may hold either of two equal candidates
                x, y = x[untied], y[untied]
            if x.dtype.is_floating_point:
                torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4, equal_nan=True)
            else:  # counts: bitwise
                assert torch.equal(x, y), name


def test_merge_rules_are_declared_by_every_tensor(monkeypatch):
    """The merge is generic over LayerStats' fields: a tensor with a rule is merged by it (a one-process group
    here), one without a rule is refused rather than silently dropped."""
    from dataclasses import dataclass, field

    import torch.distributed as dist

    from topk_ds.analysis.stats import MERGE_SUM, MERGE_TOP, LayerStats
    from topk_ds.train.distributed import free_port

    @dataclass
    class WithMore(LayerStats):
        counted: torch.Tensor | None = field(default=None, metadata=MERGE_SUM)
        top_more: torch.Tensor | None = field(default=None, metadata=MERGE_TOP)
        unruled: torch.Tensor | None = None

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ls = WithMore(**vars(LayerStats.empty(0, 5, 3, None, top=2, context=3)))
        ls.top_values = torch.tensor([[1.0, 0.5], [2.0, 0.0], [0.0, 0.0]])
        ls.counted, ls.top_more = torch.arange(6).view(3, 2), torch.arange(18.0).view(3, 2, 3)
        ls.merge_ranks()
        assert torch.equal(ls.counted, torch.arange(6).view(3, 2))
        assert torch.equal(ls.top_more[:2], torch.arange(12.0).view(2, 2, 3))  # kept in rank order
        ls.unruled = torch.zeros(3)
        with pytest.raises(ValueError, match="LayerStats.unruled has no merge rule"):
            ls.merge_ranks()
    finally:
        dist.destroy_process_group()


def test_launcher_entry_takes_the_deepspeed_local_rank_argument(tiny_hf, tmp_path, capsys, monkeypatch):
    """`deepspeed --module topk_ds.analysis` adds --local_rank=N; on one process the entry is `topk-ds analyze`."""
    from topk_ds.analysis.__main__ import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # restored afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    with pytest.raises(SystemExit) as e:
        main(["--local_rank=0", "neuron", str(tmp_path), "0:1"])
    assert e.value.code == 2 and "is not a checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        main(["--local_rank=1", "neuron", str(tmp_path), "0:1"])
    assert e.value.code == 2 and "rank 1: analyze neuron runs in one process" in capsys.readouterr().err


# --- tracing and evaluation ------------------------------------------------------------------------

def test_trace_tokenises_once_and_times_every_checkpoint(tiny_run, tmp_path, capsys, monkeypatch):
    import topk_ds.analysis.trace as trace
    from topk_ds.cli import main

    calls = []
    tokenise = trace.token_batches
    monkeypatch.setattr(trace, "token_batches", lambda *a, **k: calls.append(a) or tokenise(*a, **k))
    main(["analyze", "trace", str(tiny_run), "--neuron", "0:5", "--token", "the", "--tokens", "640", "--out",
          str(tmp_path)])
    err = capsys.readouterr().err
    assert len(calls) == 1  # one tokenisation, reused by all three checkpoints
    steps = range(RUN_SAVE_EVERY, RUN_STEPS + 1, RUN_SAVE_EVERY)
    assert all(f"global_step{s}: " in err and "(load " in err for s in steps)
    assert "analyze trace over 3 checkpoints: 1,920 tokens x" in err  # 3 x 10 windows of 64
    assert json.loads((tmp_path / "trace-5-the.json").read_text())["steps"] == list(steps)


def test_eval_frees_each_model_before_the_next_and_estimates_its_tokens(tiny_hf, tiny_run, tmp_path, capsys,
                                                                       monkeypatch):
    """Several models one after another: the previous model is gone when the next is loaded; the cost line
    counts the tokens of lm-eval's own requests (the estimate from a sample within 10 % of all of them)."""
    import lm_eval

    import topk_ds.evaluate.run as run
    from topk_ds.evaluate.suites import SUITES

    loaded = []
    load = run.load_model

    def load_model(spec, device, dtype):
        assert all(ref() is None for ref in loaded), "the previous model is still held"
        model, tok = load(spec, device, dtype)
        loaded.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(run, "load_model", load_model)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: {"results": {}})
    early = tiny_run / "checkpoints" / f"global_step{RUN_SAVE_EVERY}"
    run.evaluate([str(tiny_hf), str(early)], "local", tasks=["topk_heldout"], out=tmp_path, limit=8)
    err = capsys.readouterr().err
    assert len(loaded) == 2 and err.count(f"eval {run._label(tiny_hf)}: ") == 2 and "GFLOP" in err

    _, tasks = run._load_tasks(SUITES["local"], ["topk_heldout", "topk_topic_mc"], {})
    _, tok = load(run.describe(tiny_hf), "cpu", None)
    estimate = run.request_tokens(tasks, tok, limit=40, sample=8)
    exact = sum(len(tok("".join(map(str, i.args)), add_special_tokens=False)["input_ids"])
                for t in tasks for i in t.instances)
    assert abs(estimate - exact) <= 0.1 * exact


def test_auto_batch_size_works_on_our_model(tiny_hf):
    """lm-eval's `--batch-size auto` probes the model with its own forward passes; our HFLM takes it."""
    from lm_eval.models.huggingface import HFLM

    from topk_ds import load

    model, tok = load(tiny_hf)
    lm = HFLM(pretrained=model, tokenizer=tok, max_length=32, batch_size="auto", max_batch_size=8)
    assert lm._detect_batch_size() == 8

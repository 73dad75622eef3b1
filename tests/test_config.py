import subprocess
import sys

import pytest

from topk_ds.config import PRESETS, load_config, preset
from topk_ds.errors import UserError


def test_presets_validate_and_have_dense_twins():
    for name in ("tiny", "paper-1024x8", "paper-2048x24"):
        cfg, twin = load_config(name), load_config(f"{name}-dense")
        assert cfg.topk.enabled and not twin.topk.enabled
        assert cfg.model == twin.model
    p = preset("paper-2048x24")
    assert (p.model.dim, p.model.n_layers, p.topk.k, p.topk.n_nontopk, p.topk.anneal_ratio) == (2048, 24, 64, 2, 0.2)
    assert p.train.betas == [0.9, 0.95] and p.train.weight_decay == 0.1 and p.train.grad_clip == 1.0
    assert set(PRESETS) >= {"tiny", "tiny-dense", "paper-1024x8", "paper-1024x8-dense"}


def test_precedence_defaults_preset_yaml_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nmodel:\n  dim: 128\ntrain:\n  lr: 0.001\n")
    cfg = load_config(str(path), ["model.dim=96", "train.betas=[0.8, 0.9]", "topk.enabled=false"])
    assert cfg.model.dim == 96  # --set beats the YAML
    assert cfg.train.lr == 0.001  # the YAML beats the preset
    assert cfg.model.n_layers == 4  # the preset beats the defaults
    assert cfg.train.betas == [0.8, 0.9] and cfg.topk.enabled is False
    assert load_config(None).model.dim == 1024


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 3e-4 as a string; a config would refuse the way most people write a learning rate."""
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntrain:\n  lr: 3e-4\n")
    assert load_config(str(path)).train.lr == 3e-4
    cfg = load_config("tiny", ["train.lr=1E-3", "model.dim=9.6e1", "train.steps=1e3"])
    assert (cfg.train.lr, cfg.model.dim, cfg.train.steps) == (1e-3, 96, 1000)
    assert isinstance(cfg.train.steps, int)


@pytest.mark.parametrize("overrides, message", [
    (["topk.k=65"], "topk.k=65 exceeds model.dim=64"),
    (["topk.n_nontopk=5"], "topk.n_nontopk=5 must be in [0, model.n_layers=4]"),
    (["model.n_heads=5"], "model.dim=64 must be divisible by model.n_heads=5"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=4"),
    (["topk.act=gelu"], "topk.act='gelu' must be one of: relu, identity"),
    (["topk.anneal=sigmoid"], "topk.anneal='sigmoid'"),
    (["topk.anneal_ratio=1.5"], "topk.anneal_ratio=1.5 must be in [0, 1]"),
    (["data.seq_len=4096"], "data.seq_len=4096 must be in [1, model.max_seq_len=256]"),
    (["train.lr=-1"], "train.lr=-1.0 must be > 0"),
    (["train.lr=nan"], "train.lr must be a finite number"),
    (["model.dim=1e1.5"], "model.dim must be an integer"),
    (["model.dim=abc"], "model.dim must be an integer"),
    (["model.bogus=1"], "unknown config key 'model.bogus'; valid keys of model: dim,"),
    (["bogus.x=1"], "unknown config key 'bogus'; valid keys: data, model, topk, train"),
    (["model.dim"], "must look like section.field=value"),
    (["topk.site=attn"], "topk.site='attn' must be one of: residual, mlp"),
])
def test_validation_messages_name_the_field(overrides, message):
    with pytest.raises(UserError) as e:
        load_config("tiny", overrides)
    assert message in str(e.value)


def test_mlp_site_k_is_bounded_by_ffn_dim():
    assert load_config("tiny", ["topk.site=mlp", "topk.k=100"]).topk.k == 100
    with pytest.raises(UserError, match="exceeds model.ffn_dim=128"):
        load_config("tiny", ["topk.site=mlp", "topk.k=200"])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="neither a preset"):
        load_config("no-such-preset")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    with pytest.raises(UserError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "p.yaml").write_text("preset: huge\n")
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        load_config(str(tmp_path / "p.yaml"))


@pytest.mark.parametrize("argv", [
    ["config", "show", "--config", "tiny", "--set", "topk.k=1000"],
    ["config", "show", "--config", "nope"],
    ["corpus", "synth"],
    ["no-such-command"],
])
def test_cli_errors_are_one_line(argv):
    r = subprocess.run([sys.executable, "-m", "topk_ds.cli", *argv], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr and "Traceback" not in r.stderr


def test_every_subcommand_has_help():
    from topk_ds.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    yield path + [name]
                    yield from walk(sub, path + [name])

    paths = list(walk(build_parser(), []))
    assert ["corpus", "synth"] in paths
    for path in paths:
        r = subprocess.run([sys.executable, "-m", "topk_ds.cli", *path, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, path

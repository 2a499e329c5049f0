"""Config system: base: inheritance, --set overrides, key/type/validation errors naming the key,
Literal choices, the loader apart from the dataclasses, DeepSpeed dict."""
from __future__ import annotations

import ast
import glob
import os
import re
import sys
import typing
from typing import Literal

import pytest
import yaml

from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.train.config import (Config, DataConfig, EvalConfig, LoggingConfig, OptimConfig, ParallelConfig,
                                    TrainConfig)
from sgfm_dist.train.config_loader import config_from_dict, config_to_dict, load_config, parse_override
from sgfm_dist.parallel.batch import BatchAccounting
from sgfm_dist.parallel.parallelize import apply_zero
from sgfm_dist.train.engine import deepspeed_config
from sgfm_dist.validation import field_types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(path, data) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def chain(tmp_path):
    """grand (in a sub-folder) <- parent <- child, relative paths at each level."""
    write(tmp_path / "common" / "grand.yaml", {"optim": {"lr": 0.5, "warmup_steps": 3},
                                               "train": {"steps": 100, "seed": 7}, "data": {"rows": 64}})
    write(tmp_path / "common" / "parent.yaml", {"base": "grand.yaml", "optim": {"lr": 0.25},
                                                "model": {"width": 32}})
    child = write(tmp_path / "child.yaml", {"base": "common/parent.yaml", "train": {"steps": 50},
                                            "model": {"n_blocks": 2}})
    return child


def test_inheritance_deep_merges_child_wins(chain):
    cfg = load_config(chain)
    assert cfg.optim.lr == 0.25 and cfg.optim.warmup_steps == 3          # parent over grand, grand kept
    assert cfg.train.steps == 50 and cfg.train.seed == 7                  # child over grand
    assert cfg.model.width == 32 and cfg.model.n_blocks == 2              # parent and child merged
    assert cfg.optim.betas == Config().optim.betas                        # untouched default


@pytest.mark.parametrize("override, path, expected", [
    ("optim.lr=3e-4", ("optim", "lr"), 3e-4),                 # YAML 1.1 string "3e-4" accepted for floats
    ("train.steps=7", ("train", "steps"), 7),
    ("optim.betas=[0.8, 0.95]", ("optim", "betas"), (0.8, 0.95)),  # list -> typed tuple
    ("model.kernel_size=[3, 5]", ("model", "kernel_size"), (3, 5)),
    ("logging.progress=false", ("logging", "progress"), False),
    ("train.precision=fp16", ("train", "precision"), "fp16"),
    ("data.val_source=", ("data", "val_source"), ""),
])
def test_overrides_are_yaml_typed(chain, override, path, expected):
    cfg = load_config(chain, [override])
    assert getattr(getattr(cfg, path[0]), path[1]) == expected


def test_override_wins_over_files_and_later_overrides_win(chain):
    cfg = load_config(chain, ["optim.lr=0.1", "optim.lr=0.2"])
    assert cfg.optim.lr == 0.2


@pytest.mark.parametrize("where", ["child", "grand", "override"])
def test_unknown_key_names_file_key_and_closest(tmp_path, where):
    grand = {"optim": {"lr": 0.1}}
    child = {"base": "grand.yaml", "train": {"steps": 5}}
    overrides = []
    if where == "grand":
        grand["optim"]["learning_rte"] = 1
    elif where == "child":
        child["train"]["stepz"] = 5
    else:
        overrides = ["model.widht=64"]
    write(tmp_path / "grand.yaml", grand)
    path = write(tmp_path / "child.yaml", child)
    with pytest.raises(ValueError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    expect = {"child": ("child.yaml", "train.stepz", "train.steps"),
              "grand": ("grand.yaml", "optim.learning_rte", "optim.lr"),
              "override": ("--set model.widht=64", "model.widht", "model.width")}[where]
    for part in expect:
        assert part in msg, msg


def test_unknown_section(tmp_path):
    path = write(tmp_path / "c.yaml", {"trian": {"steps": 3}})
    with pytest.raises(ValueError, match=r"c\.yaml.*'trian'.*did you mean 'train'"):
        load_config(path)


@pytest.mark.parametrize("key, value, rule", [
    ("train.steps", "'ten'", "must be an integer"),
    ("train.steps", "2.5", "must be an integer"),
    ("optim.lr", "fast", "must be a number"),
    ("logging.progress", "1", "true or false"),
    ("train.precision", "fp8", "one of"),
    ("optim.betas", "[0.9]", "2 items"),
    ("eval.energy_taus", "0.5", "a list"),
    ("data.source", "3", "a string"),
])
def test_type_errors_name_key_and_source(chain, key, value, rule):
    with pytest.raises(ValueError) as e:
        load_config(chain, [f"{key}={value}"])
    msg = str(e.value)
    assert key in msg and rule in msg and "--set" in msg, msg


def test_type_error_names_the_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  micro_batch: eight\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*train\.micro_batch.*integer"):
        load_config(path)


@pytest.mark.parametrize("override, rule", [
    ("train.steps=0", r"--set train.steps=0: train.steps: must be a positive int, got 0"),
    ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio: must be in \[0.0, 1.0\], got 1.5"),
    ("parallel.zero_stage=4", "parallel.zero_stage: must be one of 0, 1, 2, 3, got 4"),
    ("train.ema_decay=1.0", r"train.ema_decay: must be in \[0.0, 1.0\), got 1.0"),
    ("train.stop_at=1000", "train.stop_at: 1000 is beyond train.steps"),
    ("data.rows=18", r"--set data.rows=18: data.rows: 18 is not divisible by 2\*\*model.levels"),
    ("data.rows=16", r"data.rows: 16 cells admit only 1 levels of 'db4', model.levels=2"),
    ("model.width=0", "model.width: must be a positive int"),       # the model's own __post_init__
    ("diffusion.mode=sideways", "diffusion.mode: must be one of 'joint', 'cascade', got 'sideways'"),
    ("eval.vocab_temperature=0", "eval.vocab_temperature: must be > 0"),
    ("data.num_workers=-1", "data.num_workers: must be an int >= 0, got -1"),
    ("data.corrupt=ignore", "--set data.corrupt=ignore: data.corrupt: must be one of 'skip', 'fail', got 'ignore'"),
    ("optim.warmup_steps=60", "--set optim.warmup_steps=60: optim.warmup_steps: 60 exceeds train.steps=50"),
])
def test_validation_errors(chain, override, rule):
    with pytest.raises(ValueError, match=rule):
        load_config(chain, [override])


# A wrong type and an out-of-range value for fields of every section: the dataclass (built in
# Python) and the loader (--set) both give a ValueError that names the dotted key.
BAD_VALUES = [
    # section, field, wrong type, out of range
    ("model", "width", "wide", 0),
    ("model", "forcing_blocks", 1.5, -1),
    ("model", "nu", "viscous", -1e-3),
    ("model", "kernel_size", "3", [1, 4]),                     # even: no centred stencil
    ("model", "lengths", [1.0, "x"], [1.0, -2.0]),
    ("model", "pad_id", "pad", 999),
    ("diffusion", "logsnr_min", [1], 20.0),
    ("diffusion", "lambda_R", True, -0.5),
    ("diffusion", "bc_rows", 1.0, 0),
    ("data", "rows", "many", -16),
    ("data", "source", 3, ""),
    ("data", "prefetch_factor", None, 0),
    ("data", "streams", "eight", -8),
    ("optim", "lr", "fast", 0.0),
    ("optim", "betas", [0.9, "x"], [0.9, 1.0]),
    ("optim", "min_lr_ratio", [0.1], -0.1),
    ("optim", "fused_adam", "yes", None),
    ("train", "micro_batch", "eight", 0),
    ("train", "ema_decay", "slow", -0.1),
    ("train", "out_dir", 5, ""),
    ("train", "ema_warmup", 1, None),
    ("parallel", "sp", 2.0, 0),
    ("parallel", "dp", "all", -2),
    ("parallel", "sp_grid", 2, [2, 0]),
    ("parallel", "split_axes", ["t"], [3]),
    ("parallel", "activation_checkpointing", "no", None),
    ("logging", "log_interval", "often", 0),
    ("logging", "tensorboard_dir", 1, None),
    ("logging", "progress", "on", None),
    ("eval", "n_samples", 4.5, 0),
    ("eval", "energy_taus", 0.5, [0.5, 1.0]),
    ("eval", "physics_eta", "x", -1.0),
    ("eval", "entropy_fractions", ["half"], []),
]
SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "parallel": ParallelConfig, "logging": LoggingConfig, "eval": EvalConfig}


def test_bad_values_cover_every_section():
    assert {section for section, *_ in BAD_VALUES} == set(SECTIONS)


BAD_CASES = [(section, name, kind, value) for section, name, *values in BAD_VALUES
             for kind, value in zip(("type", "range"), values) if value is not None]   # bools, free strings: no range


@pytest.mark.parametrize("section, name, kind, value", BAD_CASES,
                         ids=[f"{s}.{n}-{k}" for s, n, k, _ in BAD_CASES])
def test_bad_value_names_the_key(chain, section, name, kind, value):
    key = f"{section}.{name}"
    with pytest.raises(ValueError, match=re.escape(key)) as e:          # the dataclass itself
        SECTIONS[section](**{name: value})
    if kind == "type":
        assert "must be" in str(e.value), str(e.value)
    override = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
    with pytest.raises(ValueError, match=re.escape(key)) as e:          # the loader, naming the --set
        load_config(chain, [override])
    assert f"--set {override}" in str(e.value), str(e.value)


def _literal_fields():
    out = []
    for section, cls in SECTIONS.items():
        for name, tp in field_types(cls).items():
            if typing.get_origin(tp) is Literal:
                out.append((section, name, typing.get_args(tp)))
    return out


LITERAL_FIELDS = _literal_fields()


def test_every_choice_field_is_a_literal():
    # these stay Literal; new choice fields join them (the loop below rejects a plain str choice)
    assert {f"{s}.{n}" for s, n, _ in LITERAL_FIELDS} >= {
        "model.modality", "model.kind", "model.flow", "model.derivative", "model.time_derivative",
        "diffusion.schedule", "diffusion.mode", "diffusion.parameterization",
        "data.corrupt", "optim.schedule", "train.precision", "train.device", "parallel.zero_stage",
        "eval.sampler"}
    # no plain str field left whose default is one of a few fixed words the code branches on
    for section, cls in SECTIONS.items():
        for name, tp in field_types(cls).items():
            if tp is str:
                # free-form strings: paths, URLs, a corpus-making command, a wavelet name
                assert name in {"source", "val_source", "out_dir", "ckpt_dir", "tensorboard_dir", "wavelet",
                                "generate", "baseline_ckpt"}, \
                    f"{section}.{name}"


@pytest.mark.parametrize("section, name, allowed", LITERAL_FIELDS,
                         ids=[f"{s}.{n}" for s, n, _ in LITERAL_FIELDS])
def test_literal_rejects_bad_choice_listing_valid_ones(chain, section, name, allowed):
    key = f"{section}.{name}"
    listed = ", ".join(repr(a) for a in allowed)
    for bad in ("bogus", 7, True):
        with pytest.raises(ValueError) as e:
            SECTIONS[section](**{name: bad})
        assert f"{key}: must be one of {listed}, got {bad!r}" in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:
        load_config(chain, [f"{key}=bogus"])
    assert f"--set {key}=bogus: {key}: must be one of {listed}, got 'bogus'" in str(e.value), str(e.value)
    for good in allowed:                                               # and every listed value is accepted
        assert getattr(SECTIONS[section](**{name: good}), name) == good


def test_python_construction_normalises_like_yaml():
    assert OptimConfig(betas=[0.8, 0.9]) == OptimConfig(betas=(0.8, 0.9))
    assert OptimConfig(lr="3e-4").lr == 3e-4 and type(ModelConfig(nu=0).nu) is float
    assert ParallelConfig(sp=4, sp_grid=[2, 2]).sp_grid == (2, 2)
    assert EvalConfig(energy_taus=[0.5]).energy_taus == (0.5,)


def test_config_modules_do_not_import_the_loader():
    """The dataclasses know nothing of YAML or the loader; the checks are one stdlib-only module."""
    def imported(rel):
        modules = set()
        for n in ast.walk(ast.parse(open(os.path.join(REPO, rel)).read())):
            if isinstance(n, ast.Import):
                modules |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                module = "." * n.level + (n.module or "")
                modules |= {module} | {f"{module}.{a.name}" for a in n.names}
        return modules

    for rel in ("sgfm_dist/train/config.py", "sgfm_dist/model/config.py"):
        modules = imported(rel)
        assert not any("yaml" in m or "config_loader" in m for m in modules), (rel, modules)
    top = {m.split(".")[0] for m in imported("sgfm_dist/validation.py")}
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"base": "nope.yaml"})
    with pytest.raises(ValueError, match=r"nope\.yaml does not exist.*c\.yaml"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "a..b=1", "optim.lr=[1,"])
def test_malformed_override(bad):
    with pytest.raises(ValueError, match="--set"):
        parse_override(bad)


def test_dict_round_trip(chain):
    cfg = load_config(chain, ["model.kernel_size=[3, 5]"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
# the DeepSpeed dict the engine is built with: the config's part (engine.deepspeed_config), then
# parallelize's ZeRO stage and batch sizes (parallel.parallelize.apply_zero)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_dict(chain, device, zero, precision):
    cfg = load_config(chain, [f"parallel.zero_stage={zero}", f"train.precision={precision}",
                              "train.micro_batch=4", "train.grad_accum=3", "optim.grad_clip=0.5"])
    ds = apply_zero(deepspeed_config(cfg, device), BatchAccounting(4, 3, dp=2, sp=1), cfg.parallel.zero_stage)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["zero_optimization"]["stage"] == zero and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    if device == "cpu":
        assert ds["optimizer"]["params"]["torch_adam"] is True
        assert "torch_autocast" not in ds and "bf16" not in ds and "fp16" not in ds   # fp32 forced on CPU
    elif precision == "fp32":
        assert "torch_autocast" not in ds
    else:
        assert ds["torch_autocast"] == {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[precision]}


def test_mesh_checks():
    cfg = Config()
    assert cfg.parallel.mesh(4) == (4, 1)
    with pytest.raises(ValueError, match="does not divide"):
        config_from_dict({"parallel": {"sp": 3}}).parallel.mesh(4)
    with pytest.raises(ValueError, match="dp x sp"):
        config_from_dict({"parallel": {"dp": 3}}).parallel.mesh(4)

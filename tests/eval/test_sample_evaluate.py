"""The package functions behind ``launch/sample.py`` and ``launch/evaluate.py``, in process, on a
checkpoint written by hand (a tiny untrained model: these tests check the plumbing, the
trace ``tools/traces/text_tiny.json`` and ``tests/train/test_launch.py`` check trained runs)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from sgfm_dist.eval.evaluate import evaluate_checkpoint, evaluate_model, override_eval
from sgfm_dist.eval.sampling import SampleOptions, field_rows, sample_checkpoint
from sgfm_dist.train.config import EvalConfig

from .trained_run import write_trained_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ["model.channels=8", "model.width=16", "model.n_blocks=1", "model.forcing_width=8",
        "model.forcing_blocks=1", "model.wavelet=haar", "model.spectral_modes=[2, 4]", "model.cond_dim=32",
        "data.rows=8", "data.row_len=32", "train.micro_batch=2",
        "eval.metric_samples=2", "eval.sample_steps=1", "eval.val_batches=1", "eval.prior_bytes=20000"]


@pytest.mark.parametrize("length, row_len, levels, rows, padded", [
    (256, 32, 2, 8, False),   # exact
    (200, 32, 2, 8, True),    # ceil(200 / 32) = 7 rows -> 8 (multiple of 4)
    (1, 32, 3, 8, True),      # at least one row, then a multiple of 2**3
    (33, 32, 0, 2, True),     # no wavelet level: any row count
    (64, 32, 1, 2, False),
])
def test_field_rows(length, row_len, levels, rows, padded):
    assert field_rows(length, row_len, levels) == (rows, padded)


def test_override_eval_replaces_given_fields_and_keeps_none():
    base = EvalConfig(sample_steps=5, seed=3)
    e = override_eval(base, {"sample_steps": 9, "sampler": "heun", "seed": None, "vocab_temperature": None})
    assert (e.sample_steps, e.sampler, e.seed, e.vocab_temperature) == (9, "heun", 3, base.vocab_temperature)
    assert base.sample_steps == 5  # the base is not changed
    assert override_eval(base, {}) == base


@pytest.mark.parametrize("overrides, message", [
    ({"sample_steps": 0}, "eval.sample_steps"),
    ({"sampler": "ddim"}, "eval.sampler"),
    ({"vocab_temperature": -1.0}, "eval.vocab_temperature"),
    ({"steps": 4}, "unknown field(s) ['steps']"),
])
def test_override_eval_validates(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        override_eval(EvalConfig(), overrides)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="x" * 30, length=20), "30 bytes is longer than the field of --length 20"),
    (dict(ensemble=0), "ensemble: must be >= 1"),
    (dict(length=-1), "length: must be >= 0"),
    (dict(sp=0), "sp: must be >= 1"),
    (dict(eval_overrides={"sample_steps": 0}), "eval.sample_steps"),
])
def test_sample_options_fail_before_any_checkpoint_is_read(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleOptions(**kwargs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A run directory holding one complete checkpoint of a seeded, untrained tiny model."""
    from sgfm_dist.model.sgfm import build_model
    from sgfm_dist.train.config_loader import load_config

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(os.path.join(REPO, "configs", "text_tiny.yaml"), TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion)
    return write_trained_run(run, cfg, model)


def test_sample_checkpoint_writes_texts_and_spread(ckpt, tmp_path):
    logged = []
    out = str(tmp_path / "s.txt")
    options = SampleOptions(prompt="The ", length=200, ensemble=2, out=out,
                            eval_overrides={"sample_steps": 2, "seed": 1, "sampler": "pc"})
    r = sample_checkpoint(ckpt, options, "cpu", log=logged.append)
    assert r.step == 3 and r.tokens.shape == (2, 8, 32) and r.spread.shape == (8, 32)
    assert all(t.startswith("The ") for t in r.texts)  # the prompt rows are held fixed
    assert any("padded up to 8 rows x 32 = 256 bytes" in line for line in logged)
    text = open(out, encoding="utf-8").read()
    assert text.count("=== sample") == 2 and "(seed 1, pc, 2 steps)" in text
    assert r.png == str(tmp_path / "s_spread.png") and os.path.getsize(r.png) > 1000
    # the same request gives the same samples (one seeded generator, no global RNG)
    again = sample_checkpoint(ckpt, options, "cpu", log=lambda *a: None)
    assert torch.equal(again.tokens, r.tokens)


def test_sample_checkpoint_default_path_and_one_sample(ckpt):
    r = sample_checkpoint(ckpt, SampleOptions(eval_overrides={"sample_steps": 1}), "cpu", log=lambda *a: None)
    assert r.path == os.path.join(ckpt, "samples", "sample_step3.txt") and os.path.isfile(r.path)
    assert r.spread is None and r.png is None and r.tokens.shape == (1, 8, 32)  # the trained field


def test_evaluate_checkpoint_is_evaluate_model_on_the_loaded_weights(ckpt, tmp_path):
    """The command line's evaluation and the trainer's final one are the same function."""
    from dataclasses import replace

    from sgfm_dist.train.inference import load_trained

    out = str(tmp_path / "eval.json")
    overrides = {"metric_samples": 2, "sample_steps": 1, "val_batches": 1, "sampler": "heun"}
    s = evaluate_checkpoint(ckpt, "cpu", overrides, out=out, log=lambda *a: None)
    assert s["step"] == 3 and s["sampler"] == "heun" and json.load(open(out))["levels"] == s["levels"]
    tm = load_trained(ckpt, "cpu")
    cfg = replace(tm.config, eval=override_eval(tm.config.eval, overrides))
    direct = evaluate_model(tm.model, cfg, "cpu", log=lambda *a: None)
    assert direct["levels"] == s["levels"] and direct["samples"] == s["samples"]

"""Bad input around a run, each a clear one-line error naming the file / key / host, a non-zero
exit and nothing good overwritten (issue 14 item 8; every config field's type and range in
test_config.py, malformed and missing shards of the stream in tests/data/test_stream.py,
truncated or tampered checkpoints in test_checkpoint_world.py, a checkpoint DeepSpeed cannot
re-shard in test_reshard.py). Here, through the command lines:

* a config value of the wrong type or out of range (``--set``): exit 1 naming the key, before
  anything is written to the run directory;
* a data source that does not exist, a shard listed in the manifest but gone, a truncated shard
  (read by a DataLoader worker): ``launch/train.py --resume`` exits 1 naming ``data.source`` or
  the shard, and the run's last complete checkpoint stays as it was (bytes and ``--resume``'s pick);
* a truncated model-states file, or one replaced by a pickle that would run code, given to
  ``--resume`` on the world size that wrote it: exit 1 naming the file, the code never runs
  (DeepSpeed's own loader unpickles freely: the files are checked first), nothing is written;
* a ``--prompt`` of bytes that are not UTF-8: ``launch/sample.py`` exits 1 naming ``--prompt`` and
  the bytes, before reading the checkpoint, and an existing ``--out`` file is left as it was; an
  ``--out`` that cannot be written is refused before the checkpoint is read, not after sampling;

* an output directory that cannot be written (``train.out_dir`` below a regular file): refused
  before any process group or step, the file left as it was;
* a hostfile naming an unknown host: ``check_hostfile`` / ``make_hostfile.py --check`` name the
  file, line and host (``launch/slurm/deepspeed_node.sh`` runs the check before the launcher);
* ``MASTER_ADDR`` naming an unknown host: ``launch/train.py`` exits at once naming it, instead of
  a rendezvous timeout;
* a checkpoint whose data-order state misses streams: the error names the checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "train.py")
SAMPLE = os.path.join(REPO, "launch", "sample.py")
HOSTFILE_TOOL = os.path.join(REPO, "launch", "slurm", "make_hostfile.py")
UNKNOWN = "no-such-host.invalid"  # the .invalid TLD never resolves (RFC 2606)

TINY = {
    "base": os.path.join(REPO, "configs", "text_tiny.yaml"),
    "model": {"channels": 4, "width": 8, "n_blocks": 1, "forcing_width": 4, "forcing_blocks": 1, "wavelet": "haar",
              "spectral_modes": [2, 4], "cond_dim": 8},
    "data": {"rows": 8, "row_len": 16, "num_workers": 0},
    "optim": {"warmup_steps": 1},
    "train": {"steps": 2, "micro_batch": 2, "threads": 1, "ckpt_interval": 0, "eval_interval": 0},
    "logging": {"log_interval": 1, "progress": False},
}


def _run(cmd, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _refused(p: subprocess.CompletedProcess, *names: str) -> str:
    err = p.stderr.strip()
    assert p.returncode != 0, f"exit 0\nSTDOUT:\n{p.stdout[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    for name in names:
        assert name in err, f"{name!r} not in the error:\n{err[-2000:]}"
    return err


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_unwritable_output_directory_is_refused_before_training(tiny, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"keep me")
    out = blocker / "run"  # below a regular file: no user, root included, can create it
    p = _run([sys.executable, TRAIN, "--config", str(tiny), "--out", str(out), "--no-eval"])
    _refused(p, "train.out_dir", str(out))
    assert blocker.read_bytes() == b"keep me"


def test_unwritable_checkpoint_directory_is_refused(tiny, tmp_path):
    blocker = tmp_path / "ckpts"
    blocker.write_bytes(b"keep me")
    p = _run([sys.executable, TRAIN, "--config", str(tiny), "--out", str(tmp_path / "run"), "--no-eval",
              "--set", f"train.ckpt_dir={blocker / 'c'}"])
    _refused(p, "train.ckpt_dir")
    assert blocker.read_bytes() == b"keep me"


def test_hostfile_with_unknown_host_names_it(tmp_path):
    from sgfm_dist.parallel.mesh import check_hostfile

    good = tmp_path / "good"
    good.write_text("# two local nodes\nlocalhost slots=2\n127.0.0.1 slots=1\n")
    assert check_hostfile(str(good)) == [("localhost", 2), ("127.0.0.1", 1)]
    bad = tmp_path / "bad"
    bad.write_text(f"localhost slots=2\n{UNKNOWN} slots=2\n")
    with pytest.raises(ValueError, match=rf"hostfile {bad} line 2: unknown host '{UNKNOWN}'"):
        check_hostfile(str(bad))
    malformed = tmp_path / "malformed"
    malformed.write_text("localhost 2\n")
    with pytest.raises(ValueError, match=rf"hostfile {malformed} line 1: 'localhost 2' is not 'HOST slots=N'"):
        check_hostfile(str(malformed))
    with pytest.raises(ValueError, match="cannot read"):
        check_hostfile(str(tmp_path / "missing"))

    p = _run([sys.executable, HOSTFILE_TOOL, "--check", str(bad)])
    _refused(p, UNKNOWN, str(bad), "line 2")
    p = _run([sys.executable, HOSTFILE_TOOL, "--check", str(good)])
    assert p.returncode == 0 and "every host resolves" in p.stdout, p.stderr


def test_unknown_master_address_names_it(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": UNKNOWN, "MASTER_PORT": str(port)}
    p = _run([sys.executable, TRAIN, "--config", str(tiny), "--out", str(tmp_path / "run"), "--no-eval"], env,
             timeout=120)
    _refused(p, "MASTER_ADDR", UNKNOWN)


def test_data_state_missing_streams_is_refused():
    from sgfm_dist.data import build_text_source
    from sgfm_dist.data.stream import merge_states

    def src(r, dp):
        return build_text_source("builtin", "train", batch_size=2, rows=4, row_len=8, dp_rank=r, dp_size=dp,
                                 global_batch=8, streams=4)

    states = [src(r, 2).state_dict() for r in range(2)]
    src(1, 4).load_state_dict(merge_states(states))  # every stream there: any dp dividing 4 resumes
    with pytest.raises(ValueError, match=r"no position of data streams \[2, 3\]"):
        src(1, 2).load_state_dict(states[0])
    states[1]["steps"] += 1
    with pytest.raises(ValueError, match="dp group 1 has steps=1"):
        merge_states(states)


@pytest.mark.parametrize("override, key", [("optim.lr=fast", "optim.lr"), ("train.micro_batch=0", "train.micro_batch"),
                                           ("data.corrupt=ignore", "data.corrupt")])
def test_bad_config_value_exits_naming_the_key(tiny, tmp_path, override, key):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("a good run's config\n")
    p = _run([sys.executable, TRAIN, "--config", str(tiny), "--out", str(run), "--no-eval", "--set", override])
    assert p.returncode == 1
    _refused(p, key)
    assert os.listdir(run) == ["config.yaml"] and (run / "config.yaml").read_text() == "a good run's config\n"


def _tree_digest(path) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(path) for f in files}


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """Text shards (33 train samples in 9 shards of 4) and a 2-step run on them with its checkpoint."""
    from tests.data.conftest import convert, make_corpus

    root = tmp_path_factory.mktemp("bad_shards")
    make_corpus(root / "in", n_docs=40)
    convert([root / "in"], root / "shards", shard_samples=4, dedup=False, val_fraction=0.1)
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    p = _run([sys.executable, TRAIN, "--config", str(root / "tiny.yaml"), "--out", str(root / "run"), "--no-eval",
              "--set", f"data.source={root / 'shards'}"])
    assert p.returncode == 0, p.stderr[-3000:]
    return root


@pytest.mark.parametrize("damage", ["no_source", "shard_gone", "shard_truncated"])
def test_missing_or_malformed_shard_exits_naming_it(shard_run, tmp_path, damage):
    from sgfm_dist.train.checkpoint import latest_complete

    shards, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(shard_run / "shards", shards)
    shutil.copytree(shard_run / "run", run)
    before = _tree_digest(run / "checkpoints")
    extra = []
    if damage == "no_source":
        source, names = tmp_path / "nowhere", ["data.source", str(tmp_path / "nowhere")]
    elif damage == "shard_gone":  # listed in the manifest, gone when read
        (shards / "train-000003.tar").unlink()
        source, names = shards, ["shard not found", str(shards / "train-000003.tar")]
    else:  # cut mid-member, read by a DataLoader worker (its error arrives wrapped)
        with open(shards / "train-000002.tar", "r+b") as f:
            f.truncate(os.path.getsize(shards / "train-000002.tar") // 2 // 512 * 512 + 100)
        source, names = shards, ["corrupt shard", str(shards / "train-000002.tar")]
        extra = ["--set", "data.num_workers=1"]
    # 30 steps of 2 samples: more than the epoch of 33, so every shard is read
    p = _run([sys.executable, TRAIN, "--config", str(shard_run / "tiny.yaml"), "--out", str(run), "--no-eval",
              "--resume", "--set", f"data.source={source}", "--set", "train.steps=30"] + extra)
    assert p.returncode == 1
    _refused(p, *names)
    assert _tree_digest(run / "checkpoints") == before
    assert latest_complete(str(run / "checkpoints")).endswith("step00000002")


def test_prompt_of_invalid_bytes_exits_naming_it(tmp_path):
    out = tmp_path / "samples.txt"
    out.write_bytes(b"keep me")
    # argv as bytes: exactly what a shell passes for $'The \xff\xfe'
    p = _run([sys.executable, SAMPLE, "--ckpt", str(tmp_path / "no_run"), "--prompt", b"The \xff\xfe end",
              "--out", str(out), "--device", "cpu"])
    assert p.returncode == 1
    _refused(p, "--prompt: not valid UTF-8", "b'\\xff\\xfe' at character 4")
    assert out.read_bytes() == b"keep me"
    # an --out that cannot be written: refused before the checkpoint is read (not after sampling)
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"keep me too")
    p = _run([sys.executable, SAMPLE, "--ckpt", str(tmp_path / "no_run"), "--prompt", "The ",
              "--out", str(blocker / "samples.txt"), "--device", "cpu"])
    assert p.returncode == 1
    _refused(p, "--out", str(blocker))
    assert blocker.read_bytes() == b"keep me too"
    from sgfm_dist.eval.sampling import SampleOptions

    with pytest.raises(ValueError, match="--prompt: not valid UTF-8"):
        SampleOptions(prompt="ab\ud800")  # a lone surrogate from Python code
    assert SampleOptions(prompt="é✓").prompt == "é✓"


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_damaged_checkpoint_on_resume_is_refused_naming_the_file(shard_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(shard_run / "run", run)
    f = run / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        f.write_bytes(pickle.dumps(Evil()))
    before = _tree_digest(run / "checkpoints")
    p = _run([sys.executable, TRAIN, "--config", str(shard_run / "tiny.yaml"), "--out", str(run), "--no-eval",
              "--resume", "--set", f"data.source={shard_run / 'shards'}", "--set", "train.steps=4"])
    assert p.returncode == 1
    _refused(p, str(f), "truncated or tampered")
    assert not marker.exists(), "the tampered checkpoint's pickle ran"
    assert _tree_digest(run / "checkpoints") == before

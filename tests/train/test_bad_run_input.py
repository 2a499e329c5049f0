"""Bad input around a run, each a clear one-line error naming the file / key / host, a non-zero
exit and nothing good overwritten (issue 14 item 8; the config fields are in test_config.py,
malformed shards in tests/data/test_stream.py, truncated or tampered checkpoints in
test_checkpoint_world.py):

* an output directory that cannot be written (``train.out_dir`` below a regular file): refused
  before any process group or step, the file left as it was;
* a hostfile naming an unknown host: ``check_hostfile`` / ``make_hostfile.py --check`` name the
  file, line and host (``launch/slurm/deepspeed_node.sh`` runs the check before the launcher);
* ``MASTER_ADDR`` naming an unknown host: ``launch/train.py`` exits at once naming it, instead of
  a rendezvous timeout;
* a checkpoint whose data-order state misses streams: the error names the checkpoint.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "train.py")
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

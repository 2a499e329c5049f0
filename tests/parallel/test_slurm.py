"""SLURM support on one machine: the node-list parser, launcher detection and the env://
variables of an srun task, ``launch/slurm/make_hostfile.py``, the command lines the sbatch
scripts generate (their ``SGFM_DRY_RUN`` mode), and a real run of ``train_srun.sbatch`` on 2
simulated "nodes" (127.0.0.1 and 127.0.0.2, both loopback) with 2 tasks each (dp 2 x sp 2),
executed by bash with a stand-in ``srun`` on the PATH that starts each task with the variables
real srun gives it (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_*).
``train_deepspeed.sbatch`` runs the same way (``SGFM_SLURM_DEEPSPEED_E2E=1`` adds that run,
about 30 s more: two deepspeed launchers in their no-ssh mode, one process per node)."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest
import yaml

from sgfm_dist.parallel.mesh import detect_launcher, expand_nodelist, expand_tasks_per_node, slurm_env, slurm_hostnames

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_DIR = os.path.join(REPO, "launch", "slurm")
HOSTFILE_TOOL = os.path.join(SLURM_DIR, "make_hostfile.py")


# ----------------------------------------------------------------------------- node lists
@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-10],cpu1", ["gpu8", "gpu9", "gpu10", "cpu1"]),
    ("a[1-2]-ib,b[009-010]", ["a1-ib", "a2-ib", "b009", "b010"]),
    ("r[1-2]n[3-4]", ["r1n3", "r1n4", "r2n3", "r2n4"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad, message", [
    ("node[01-", "unbalanced brackets"), ("node]1[", "unbalanced brackets"), ("node[3-1]", "runs backwards"),
    ("a,,b", "empty host name"), ("n[x]", "'x' is not a number"), ("", "empty host name"),
])
def test_expand_nodelist_rejects_malformed_lists(bad, message):
    with pytest.raises(ValueError, match=message):
        expand_nodelist(bad)


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="N or N\\(xM\\)"):
        expand_tasks_per_node("2x3")


def _fake_tool(folder, name: str, script: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def test_scontrol_expands_when_present(tmp_path, monkeypatch):
    # SLURM's own expansion wins over the built-in parser when scontrol is on the PATH
    _fake_tool(tmp_path, "scontrol", "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'first\\nsecond\\n'\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm_hostnames("whatever[1-2]") == ["first", "second"]


# ----------------------------------------------------------------------------- detection
STEP = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize("env, launcher", [
    ({}, "none"),
    ({"RANK": "0", "WORLD_SIZE": "2", **STEP}, "env"),          # deepspeed/torchrun inside an srun step
    (STEP, "slurm"),
    ({**STEP, "PMI_RANK": "5", "PMI_SIZE": "8"}, "slurm"),      # srun --mpi=pmi2: the same numbers
    ({**STEP, "OMPI_COMM_WORLD_RANK": "13", "OMPI_COMM_WORLD_SIZE": "16"}, "mpi"),  # mpirun in an allocation
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, "mpi"),
    # the batch script itself: SLURM_PROCID and SLURM_NTASKS but no step task count -> a lone process
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]"}, "none"),
])
def test_detect_launcher(env, launcher):
    assert detect_launcher(env) == launcher


def test_slurm_env_gives_rank_world_local_rank_and_rank0_node(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the built-in parser
    assert slurm_env(STEP) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                               "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 10000)}
    # the step's own node list first, then the job's; explicit MASTER_* win; SLURM_NTASKS when srun
    # gives no step count (older versions)
    mixed = {**STEP, "SLURM_STEP_NODELIST": "n[3-4]", "MASTER_PORT": "29999"}
    assert slurm_env(mixed)["MASTER_ADDR"] == "n3" and slurm_env(mixed)["MASTER_PORT"] == "29999"
    assert slurm_env({**STEP, "MASTER_ADDR": "10.0.0.1"})["MASTER_ADDR"] == "10.0.0.1"
    old = {k: v for k, v in STEP.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert slurm_env(old)["WORLD_SIZE"] == "8"


def test_slurm_env_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match="SLURM_PROCID: expected an integer"):
        slurm_env({**STEP, "SLURM_PROCID": "x"})
    no_list = {k: v for k, v in STEP.items() if "NODELIST" not in k}
    with pytest.raises(ValueError, match="cannot tell where rank 0 runs"):
        slurm_env(no_list)


# ----------------------------------------------------------------------------- scripts
def _run(cmd, env_extra: dict, timeout=60, cwd=REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SGFM_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                 "MASTER_ADDR", "MASTER_PORT", "HOSTFILE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_extra)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(p) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}"
    return p.stdout


def _make_hostfile(monkeypatch, capsys, argv, env):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_hostfile", HOSTFILE_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        code = tool.main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_make_hostfile(tmp_path, monkeypatch, capsys):
    job = {"SLURM_JOB_NODELIST": "gpu[01-02,05]"}
    assert _make_hostfile(monkeypatch, capsys, ["--slots", "4"], job) == \
        (0, "gpu01 slots=4\ngpu02 slots=4\ngpu05 slots=4\n", "")
    assert _make_hostfile(monkeypatch, capsys, [], {**job, "SLURM_GPUS_ON_NODE": "8"})[1].startswith("gpu01 slots=8\n")
    assert _make_hostfile(monkeypatch, capsys, [], {**job, "SLURM_GPUS_PER_NODE": "h100:4"})[1].startswith("gpu01 slots=4")
    assert _make_hostfile(monkeypatch, capsys, [], {**job, "SLURM_NTASKS_PER_NODE": "2(x3)"})[1].startswith("gpu01 slots=2")
    assert _make_hostfile(monkeypatch, capsys, ["--master"], job)[:2] == (0, "gpu01\n")
    out = str(tmp_path / "h")
    assert _make_hostfile(monkeypatch, capsys, ["--nodelist", "a[1-2]", "--slots", "2", "--out", out], job)[0] == 0
    assert (tmp_path / "h").read_text() == "a1 slots=2\na2 slots=2\n"
    code, _, err = _make_hostfile(monkeypatch, capsys, [], job)  # no GPU or task count anywhere
    assert code == 2 and "pass --slots N" in err
    code, _, err = _make_hostfile(monkeypatch, capsys, ["--slots", "2"], {})
    assert code == 2 and "no node list" in err
    code, _, err = _make_hostfile(monkeypatch, capsys, ["--nodelist", "gpu[01-", "--slots", "2"], job)
    assert code == 2 and "unbalanced brackets" in err


ALLOC = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "8",
         "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_SUBMIT_DIR": REPO, "SGFM_DRY_RUN": "1"}


def test_srun_script_command_line():
    out = _ok(_run(["bash", os.path.join(SLURM_DIR, "train_srun.sbatch"), "--config", "configs/a b.yaml",
                    "--set", "parallel.sp=4"], ALLOC))
    assert out == "srun --kill-on-bad-exit=1 python -u launch/train.py --resume --config configs/a\\ b.yaml " \
                  "--set parallel.sp=4\n"


def test_deepspeed_script_command_lines(tmp_path):
    env = {**ALLOC, "HOSTFILE": str(tmp_path / "hosts")}
    out = _ok(_run(["bash", os.path.join(SLURM_DIR, "train_deepspeed.sbatch"), "--config", "c.yaml"], env))
    assert out == ("gpu01 slots=8\ngpu02 slots=8\n"
                   "srun --kill-on-bad-exit=1 --ntasks-per-node=1 launch/slurm/deepspeed_node.sh --config c.yaml\n")
    # what srun then runs on the second node
    node = {"HOSTFILE": str(tmp_path / "hosts"), "MASTER_ADDR": "gpu01", "MASTER_PORT": str(20000 + 4242),
            "SLURM_NODEID": "1", "SGFM_DRY_RUN": "1"}
    out = _ok(_run([os.path.join(SLURM_DIR, "deepspeed_node.sh"), "--config", "c.yaml"], node))
    assert out == (f"deepspeed --hostfile {tmp_path / 'hosts'} --no_ssh --node_rank 1 --master_addr gpu01 "
                   f"--master_port 24242 launch/train.py --resume --config c.yaml\n")
    p = _run([os.path.join(SLURM_DIR, "deepspeed_node.sh")], {k: v for k, v in node.items() if k != "SLURM_NODEID"})
    assert p.returncode != 0 and "not an srun task" in p.stderr


# ----------------------------------------------------------------------------- 2 x 2 for real
FAKE_SRUN = r'''#!{python}
"""srun on one machine: starts the step's tasks with the variables srun gives each task."""
import os, subprocess, sys, time

args, opts, kill_on_bad_exit = sys.argv[1:], {{}}, False
while args and args[0].startswith("-"):
    a = args.pop(0)
    if a.startswith("--kill-on-bad-exit"):
        kill_on_bad_exit = a.partition("=")[2] != "0"
    else:
        opts.update([a.split("=", 1)])
env = os.environ
nodes = int(env["SLURM_JOB_NUM_NODES"])
per_node = int(opts.get("--ntasks-per-node", env["SLURM_NTASKS_PER_NODE"]))
procs = []
for node in range(nodes):
    for local in range(per_node):
        procs.append(subprocess.Popen(args, env=dict(
            env, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
            SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(nodes * per_node), SLURM_STEP_NUM_NODES=str(nodes),
            SLURM_STEP_NODELIST=env["SLURM_JOB_NODELIST"], SLURM_STEP_TASKS_PER_NODE=f"{{per_node}}(x{{nodes}})")))
while any(p.poll() is None for p in procs):
    if kill_on_bad_exit and any(p.returncode not in (None, 0) for p in procs):
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.1)
sys.exit(next((abs(p.returncode) for p in procs if p.returncode), 0))
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    """A PATH with the stand-in srun, a tiny dp 2 x sp 2 config, and the allocation's variables:
    2 "nodes" 127.0.0.1 and 127.0.0.2 (both loopback, so rank 0's node resolves)."""
    root = tmp_path_factory.mktemp("slurm")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "srun", FAKE_SRUN.format(python=sys.executable))
    cfg = {"base": os.path.join(REPO, "configs", "text_tiny.yaml"),
           "model": {"channels": 8, "width": 16, "n_blocks": 1, "forcing_width": 8, "forcing_blocks": 1,
                     "wavelet": "haar", "spectral_modes": [2, 4], "cond_dim": 32},
           "data": {"rows": 16, "row_len": 32, "num_workers": 0}, "optim": {"lr": 1.0e-2, "warmup_steps": 1},
           "train": {"steps": 2, "micro_batch": 2, "threads": 1}, "parallel": {"sp": 2},
           "logging": {"log_interval": 1, "progress": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    alloc = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_SUBMIT_DIR": REPO}
    return root, alloc


def _check_2x2(stdout: str, run_dir) -> None:
    assert "mesh: rank 0/4: dp 0/2, sp 0/2" in stdout, stdout[-3000:]
    assert (run_dir / "checkpoints" / "step00000002" / "complete.json").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_srun_script_trains_2x2(fake_cluster):
    root, alloc = fake_cluster
    env = {**alloc, "SLURM_JOB_ID": "5001", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2",
           "MASTER_PORT": str(_port())}
    p = _run(["bash", os.path.join(SLURM_DIR, "train_srun.sbatch"), "--config", str(root / "cfg.yaml"),
              "--out", str(root / "srun"), "--no-eval"], env, timeout=300)
    _check_2x2(_ok(p), root / "srun")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not os.environ.get("SGFM_SLURM_DEEPSPEED_E2E"),
                    reason="about 30 s on 2 cores; its command lines are checked above (set SGFM_SLURM_DEEPSPEED_E2E=1)")
def test_deepspeed_script_trains_2x1(fake_cluster):
    """One deepspeed launcher per "node" (no ssh), one process each."""
    root, alloc = fake_cluster
    env = {**alloc, "SLURM_JOB_ID": "5002", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
           "SLOTS_PER_NODE": "1", "HOSTFILE": str(root / "hostfile"), "MASTER_PORT": str(_port())}
    p = _run(["bash", os.path.join(SLURM_DIR, "train_deepspeed.sbatch"), "--config", str(root / "cfg.yaml"),
              "--out", str(root / "ds"), "--no-eval", "--set", "parallel.sp=1"], env, timeout=300)
    out = _ok(p)
    assert "mesh: rank 0/2: dp 0/2, sp 0/1" in out, out[-3000:]
    assert (root / "ds" / "checkpoints" / "step00000002" / "complete.json").exists()
    assert (root / "hostfile").read_text() == "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
    assert "global_rank_mapping=defaultdict(<class 'list'>, {'127.0.0.1': [0], '127.0.0.2': [1]})" in out

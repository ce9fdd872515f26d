"""launch/slurm/*.sbatch with DRY_RUN=1 in a fake SLURM environment, without SLURM.

The scripts run under bash with an empty PATH (no scontrol, srun or python can be found), so
this also proves the dry run needs nothing but bash. Each run is a few milliseconds.
"""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "launch" / "slurm"
BASH = shutil.which("bash") or "/bin/bash"
SCRIPTS = ["pretrain_llama2_7b.sbatch", "pretrain_llama2_13b.sbatch", "pretrain_tiny_cpu.sbatch"]


@pytest.fixture
def empty_path(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    return d


def run_script(script, tmp_path, empty_path, *args, **env_over):
    env = {"PATH": str(empty_path), "HOME": str(tmp_path), "DRY_RUN": "1",
           "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NNODES": "4", "SLURM_JOB_ID": "123",
           "HF_CHECKPOINT": "/models/Llama-2-hf", "DATA_PATH": "/data/corpus_text_document",
           "TOKENIZER_MODEL": "/data/tokenizer.model", "RUN_DIR": str(tmp_path / "run")}
    env.update(env_over)
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([BASH, str(SLURM_DIR / script), *args], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=10)


class Plan:
    def __init__(self, stdout):
        self.lines = stdout.splitlines()
        self.comments = [ln for ln in self.lines if ln.startswith("#")]
        commands = [shlex.split(ln) for ln in self.lines if not ln.startswith("#")]
        export = next(c for c in commands if c[0] == "export")
        self.env = dict(kv.split("=", 1) for kv in export[1:])
        self.srun = next(c for c in commands if c[0] == "srun")
        self.mkdir = next(c for c in commands if c[0] == "mkdir")
        i = next(i for i, a in enumerate(self.srun) if a.endswith("launch/pretrain.py"))
        self.launcher = self.srun[:i]
        self.flags = self.srun[i + 1:]

    def flag(self, name):
        """The last value of --name (as argparse takes it); None when absent."""
        vals = [self.flags[i + 1] for i, a in enumerate(self.flags) if a == name]
        return vals[-1] if vals else None

    def srun_opt(self, name):
        return next((a.split("=", 1)[1] for a in self.launcher if a.startswith(name + "=")), None)


def plan_of(r):
    assert r.returncode == 0, r.stderr
    return Plan(r.stdout)


def test_7b_srun_plan_on_four_nodes(tmp_path, empty_path):
    p = plan_of(run_script("pretrain_llama2_7b.sbatch", tmp_path, empty_path))
    assert "# nodes (4): gpu01 gpu02 gpu03 gpu04" in p.comments
    assert any("world size 32 = 4 nodes x 8 ranks per node, launcher srun" in c for c in p.comments)
    assert p.env["MASTER_ADDR"] == "gpu01"
    assert p.env["MASTER_PORT"] == "15123"  # derived from SLURM_JOB_ID
    assert p.env["OMP_NUM_THREADS"] == "1"
    assert (p.srun_opt("--nodes"), p.srun_opt("--ntasks"), p.srun_opt("--ntasks-per-node")) == ("4", "32", "8")
    assert p.launcher[-1] == "python"
    assert p.srun[len(p.launcher)] == str(REPO / "launch" / "pretrain.py")
    expect = {"--model-config": "llama2-7b", "--hf-checkpoint": "/models/Llama-2-hf",
              "--tensor-model-parallel-size": "1", "--ds_config": str(REPO / "configs" / "ds_zero1.json"),
              "--seq-length": "4096", "--micro-batch-size": "1", "--global-batch-size": "1024",
              "--lr": "3e-5", "--min-lr": "3e-6", "--data-path": "/data/corpus_text_document",
              "--save": str(tmp_path / "run" / "checkpoints"),
              "--tensorboard-dir": str(tmp_path / "run" / "tensorboard")}
    assert {k: p.flag(k) for k in expect} == expect
    # SAT's settings are the project's defaults (sat_dist/config.py), not repeated in the script
    assert [p.flag(k) for k in ("--sat-schedule", "--sat-omission-mlp", "--sat-omission-attn")] == [None] * 3
    for k in ("--train-iters", "--lr-warmup-iters", "--save-interval"):
        assert int(p.flag(k)) > 0
    assert "--bf16" in p.flags
    assert p.flag("--load") is None  # nothing to resume yet
    assert p.mkdir[-3:] == [str(tmp_path / "run" / d) for d in ("logs", "tensorboard", "checkpoints")]
    assert not (tmp_path / "run").exists()  # a dry run starts and creates nothing


def test_13b_defaults_to_tp2_and_resumes_only_with_latest(tmp_path, empty_path):
    p = plan_of(run_script("pretrain_llama2_13b.sbatch", tmp_path, empty_path))
    assert (p.flag("--model-config"), p.flag("--tensor-model-parallel-size")) == ("llama2-13b", "2")
    assert p.flag("--load") is None
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    p = plan_of(run_script("pretrain_llama2_13b.sbatch", tmp_path, empty_path))
    assert p.flag("--load") is None  # an empty directory is not a checkpoint
    (ckpt / "latest").write_text("iter_0000250\n")
    p = plan_of(run_script("pretrain_llama2_13b.sbatch", tmp_path, empty_path))
    assert p.flag("--load") == p.flag("--save") == str(ckpt)


def test_environment_and_extra_flags_override(tmp_path, empty_path):
    r = run_script("pretrain_llama2_7b.sbatch", tmp_path, empty_path, "--lr", "1e-5", "--seed", "7",
                   TP="2", GPUS_PER_NODE="4", TRAIN_ITERS="100", MASTER_PORT="29500", OMP_NUM_THREADS="6",
                   MODEL_CONFIG="/cfg/my.json", SLURM_JOB_NAME="exp1", RUN_DIR=None)
    p = plan_of(r)
    assert any("world size 16 = 4 nodes x 4 ranks per node" in c for c in p.comments)
    assert (p.srun_opt("--ntasks"), p.srun_opt("--ntasks-per-node")) == ("16", "4")
    assert (p.env["MASTER_PORT"], p.env["OMP_NUM_THREADS"]) == ("29500", "6")
    assert p.flag("--tensor-model-parallel-size") == "2"
    assert p.flag("--train-iters") == "100"
    assert p.flag("--model-config") == "/cfg/my.json"
    assert p.flag("--lr") == "1e-5" and p.flag("--seed") == "7"  # "$@" comes after the defaults
    assert p.flag("--save") == str(tmp_path / "runs" / "exp1" / "checkpoints")  # runs/$SLURM_JOB_NAME


def test_torchrun_launcher_one_agent_per_node(tmp_path, empty_path):
    p = plan_of(run_script("pretrain_llama2_7b.sbatch", tmp_path, empty_path, LAUNCHER="torchrun",
                           SLURM_CPUS_ON_NODE="96"))
    assert (p.srun_opt("--nodes"), p.srun_opt("--ntasks"), p.srun_opt("--ntasks-per-node")) == ("4", "4", "1")
    assert p.srun_opt("--cpus-per-task") == "96"
    assert p.env["OMP_NUM_THREADS"] == "12"  # 96 CPUs / 8 ranks
    t = p.launcher[p.launcher.index("torchrun", p.launcher.index("bash")) + 1:]
    assert t[0] == "torchrun"
    opts = dict(zip(t[1::2], t[2::2]))
    assert opts == {"--nnodes": "4", "--nproc-per-node": "8", "--rdzv-id": "123", "--rdzv-backend": "c10d",
                    "--rdzv-endpoint": "gpu01:15123"}
    # the agent ignores SIGUSR1 so that only the trainer ranks act on it
    assert p.launcher[p.launcher.index("bash") + 1:p.launcher.index("bash") + 3] == \
        ["-c", 'trap "" USR1; exec "$@"']


def test_tiny_cpu_plan(tmp_path, empty_path):
    p = plan_of(run_script("pretrain_tiny_cpu.sbatch", tmp_path, empty_path, SLURM_JOB_NODELIST="n[1-2]",
                           SLURM_NNODES="2", HF_CHECKPOINT=None))
    assert "# nodes (2): n1 n2" in p.comments and p.env["MASTER_ADDR"] == "n1"
    assert (p.srun_opt("--ntasks"), p.srun_opt("--ntasks-per-node")) == ("2", "1")
    assert p.flag("--model-config") == "tiny-test" and p.flag("--hf-checkpoint") is None
    assert p.flag("--tokenizer-model") == "/data/tokenizer.model"
    assert "--bf16" not in p.flags


@pytest.mark.parametrize("nodelist,expected", [
    ("gpu[01-03,07],login1", "gpu01 gpu02 gpu03 gpu07 login1"),
    ("n1", "n1"),
    ("node[098-101]", "node098 node099 node100 node101"),
    ("a[1,3-4],b[07]", "a1 a3 a4 b07"),
    ("r[1-2]n[1-2]", "r1n1 r1n2 r2n1 r2n2"),
])
def test_hostlist_expansion_without_scontrol(tmp_path, empty_path, nodelist, expected):
    n = len(expected.split())
    p = plan_of(run_script("pretrain_llama2_7b.sbatch", tmp_path, empty_path, SLURM_JOB_NODELIST=nodelist,
                           SLURM_NNODES=str(n), GLOBAL_BATCH_SIZE=str(8 * n)))
    assert f"# nodes ({n}): {expected}" in p.comments
    assert p.env["MASTER_ADDR"] == expected.split()[0]
    assert p.srun_opt("--ntasks") == str(8 * n)


@pytest.mark.skipif(not shutil.which("scontrol"), reason="scontrol not installed: nothing to compare with")
def test_fallback_expansion_agrees_with_scontrol(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")  # enough for `show hostnames`
    for nodelist in ("gpu[01-03,07],login1", "node[098-101]", "a[1,3-4],b[07]", "n[1-2]", "x[9-10]"):
        real = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              env=dict(os.environ, SLURM_CONF=str(conf)), check=True).stdout.split()
        ours = subprocess.run([BASH, "-c", f'source {SLURM_DIR}/common.sh; sat_expand_hostlist "$1"', "_", nodelist],
                              capture_output=True, text=True, check=True).stdout.split()
        assert ours == real, nodelist


@pytest.mark.parametrize("over,message", [
    ({"HF_CHECKPOINT": None}, "error: HF_CHECKPOINT is not set; export the HF Llama-2 directory"),
    ({"DATA_PATH": ""}, "error: DATA_PATH is not set; export the prefix of the tokenized corpus (PREFIX.bin/.idx)"),
    ({"SLURM_JOB_NODELIST": None}, "error: SLURM_JOB_NODELIST is not set; submit with sbatch"),
    ({"SLURM_JOB_NODELIST": "gpu[01-04"}, "error: bad node list 'gpu[01-04': unmatched ["),
    ({"SLURM_JOB_NODELIST": "gpu[04-01]"}, "error: bad node list 'gpu[04-01]': range 04-01 runs backwards"),
    ({"SLURM_NNODES": "3"}, "error: SLURM_NNODES=3 but SLURM_JOB_NODELIST=gpu[01-04] names 4 nodes"),
    ({"TP": "3"}, "error: TP=3 does not divide the world size 32"),
    ({"GLOBAL_BATCH_SIZE": "100"}, "error: GLOBAL_BATCH_SIZE=100 is not a multiple of MICRO_BATCH_SIZE x "
                                   "data-parallel size = 1 x 32"),
    ({"GPUS_PER_NODE": "eight"}, "error: GPUS_PER_NODE=eight: expected a positive integer"),
    ({"LAUNCHER": "mpirun"}, "error: LAUNCHER=mpirun: expected srun or torchrun"),
])
def test_bad_input_one_error_line_exit_2(tmp_path, empty_path, over, message):
    r = run_script("pretrain_llama2_7b.sbatch", tmp_path, empty_path, **over)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(message), r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_headers(script):
    text = (SLURM_DIR / script).read_text()
    assert subprocess.run([BASH, "-n", str(SLURM_DIR / script)]).returncode == 0
    opts = dict((o.split("=", 1) + [""])[:2] for o in re.findall(r"^#SBATCH (\S+)", text, re.M))
    assert opts["--signal"].startswith("B:USR1@")  # to the batch shell, which forwards it
    assert "--requeue" in opts and "--exclusive" in opts
    assert opts["--output"] == "logs/%x-%j.out" and opts["--open-mode"] == "append"
    if script != "pretrain_tiny_cpu.sbatch":
        assert opts["--gpus-per-node"] == "8" and opts["--ntasks-per-node"] == "8"


# The requeue decision after the step exits, with a fake scontrol that records its call.
@pytest.mark.parametrize("latest,rc,requeued", [
    ("iter_0000004", 0, True),     # saved mid-run: requeue
    ("iter_0000030", 0, False),    # the signal came during the last step: finished
    ("iter_0000004", 143, False),  # the step failed: do not loop on a crash
])
def test_requeue_only_when_preempted_run_is_unfinished(tmp_path, empty_path, latest, rc, requeued):
    calls = tmp_path / "calls"
    fake = empty_path / "scontrol"
    fake.write_text(f'#!{BASH}\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text(latest + "\n")
    code = (f'source {SLURM_DIR}/common.sh; CKPT_DIR={ckpt}; RUN_DIR={tmp_path}; SLURM_JOB_ID=77; '
            f'sat_requeue_if_unfinished {rc} --train-iters 10 --lr 1 --train-iters 30')
    r = subprocess.run([BASH, "-c", code], env={"PATH": str(empty_path)}, capture_output=True, text=True)
    assert r.returncode == rc, r.stderr
    assert (calls.read_text() if calls.exists() else "") == ("requeue 77\n" if requeued else "")


@pytest.mark.parametrize("script", SCRIPTS)
def test_data_path_blend_becomes_separate_arguments(script, tmp_path, empty_path):
    p = plan_of(run_script(script, tmp_path, empty_path, DATA_PATH="0.9 /data/new_text 0.1 /data/old_text"))
    i = p.flags.index("--data-path")
    assert p.flags[i + 1:i + 5] == ["0.9", "/data/new_text", "0.1", "/data/old_text"]
    assert p.flags[i + 5].startswith("--")


def test_finetune_from_starts_a_stage_once_then_resumes_its_own_checkpoints(tmp_path, empty_path):
    stage1 = "/runs/stage1/checkpoints"
    p = plan_of(run_script("pretrain_llama2_7b.sbatch", tmp_path, empty_path, FINETUNE_FROM=stage1))
    assert p.flag("--load") == stage1 and "--finetune" in p.flags
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("iter_0000250\n")  # the requeued job: the stage's own checkpoint
    p = plan_of(run_script("pretrain_llama2_7b.sbatch", tmp_path, empty_path, FINETUNE_FROM=stage1))
    assert p.flag("--load") == str(ckpt) and "--finetune" not in p.flags

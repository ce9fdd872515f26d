"""Nothing lost, nothing silently wrong (issue [R]): checkpoint checksums, recovery when
`latest` is gone, refusal to save over complete checkpoints, data that changed under a
run, a run that ends non-finite, signals through the real launchers, and the tools' bad
input. Every case starts from a real checkpoint or dataset and checks that nothing on disk
changed where nothing should."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.launchers import BIN, PRETRAIN, REPO, _env, _flags, _port, digest, scalars, torchrun

EXPORT = str(REPO / "tools" / "export_hf.py")
PREPROCESS = str(REPO / "tools" / "preprocess_data.py")


@pytest.fixture
def ckpt(reference_run, tmp_path):
    """A copy of the reference run's checkpoints (iter_2, 4, 6; TP 1 x DP 2)."""
    d = tmp_path / "ckpt"
    shutil.copytree(reference_run[0] / "ckpt", d)
    return d


def _error_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def _refused(r, *words):
    """Exit 2, one `error:` line holding `words`, no traceback."""
    errors = _error_lines(r)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert len(errors) >= 1 and all(w in errors[0] for w in words), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


def _pretrain(flags, timeout=300):
    """launch/pretrain.py in one process (its own exit status, not a launcher's)."""
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    return subprocess.run([sys.executable, PRETRAIN, *flags], capture_output=True, text=True, env=_env(**env),
                          timeout=timeout, cwd=REPO)


def _python(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=REPO, **kw)


def test_save_refuses_complete_checkpoints_without_latest_and_load_offers_them(corpus, reference_run, ckpt,
                                                                               tmp_path):
    """D3: `latest` missing. --save without --load is refused (the complete iter_* count, not
    only `latest`); --load lists the complete checkpoints and how to resume the newest, never
    advises starting fresh; --ckpt-step resumes one and reproduces the reference exactly."""
    (ckpt / "latest").unlink()
    before = digest(ckpt)
    r = _pretrain(_flags(corpus, save=ckpt))
    _refused(r, f"--save {ckpt} already holds complete checkpoints", "iter_0000006")
    r = _pretrain(_flags(corpus, load=ckpt, save=ckpt))
    err = _refused(r, "latest file is missing", "iter_0000002, iter_0000004, iter_0000006", "--ckpt-step 6")
    assert "start fresh" not in err
    assert digest(ckpt) == before
    # a checkpoint directory given to --load: the parent and the step are named
    r = _pretrain(_flags(corpus, load=ckpt / "iter_0000004", save=tmp_path / "other"))
    _refused(r, f"--load {ckpt} --ckpt-step 4")
    torchrun(2, _flags(corpus, load=ckpt, save=ckpt, **{"ckpt-step": 4, "tensorboard-dir": tmp_path / "tb"}))
    got, ref = scalars(tmp_path / "tb", "lm loss"), reference_run[2]
    assert [got[s] for s in (5, 6)] == [ref[s] for s in (5, 6)]


def test_damaged_bytes_are_refused_naming_the_file(corpus, ckpt):
    """D4: 64 KiB overwritten inside a state file, same size. The resume and the export both
    refuse it naming the file and the way out; nothing is written."""
    (ckpt / "latest").write_text("iter_0000004\n")
    shutil.rmtree(ckpt / "iter_0000006")
    f = ckpt / "iter_0000004" / "state_tp00_dp001.pt"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.seek(size // 3)
        fh.write(os.urandom(64 << 10))
    assert f.stat().st_size == size
    before = digest(ckpt)
    r = _pretrain(_flags(corpus, load=ckpt, save=ckpt))
    _refused(r, "state_tp00_dp001.pt", "checksum", "--ckpt-step")
    assert digest(ckpt) == before
    out = ckpt.parent / "hf"
    r = _python(EXPORT, "--load", ckpt, "--output", out)
    _refused(r, "state_tp00_dp001.pt", "checksum")
    assert not out.exists()
    # a truncated file is found by its size, before any rank starts
    with open(f, "r+b") as fh:
        fh.truncate(size - 10)
    r = _pretrain(_flags(corpus, load=ckpt, save=ckpt))
    _refused(r, "state_tp00_dp001.pt", "bytes", "the manifest records", "--ckpt-step 2")


def test_manifests_of_bad_bytes_or_types_are_one_error(corpus, ckpt):
    """D1, D2: a manifest of non-UTF-8 bytes, or valid JSON with a wrong type, is one
    `error:` line for resume and export (no UnicodeDecodeError or TypeError traceback)."""
    m = ckpt / "iter_0000006" / "sat_dist.json"
    good = m.read_bytes()
    for bad, words in ((b"\xff\xfe\x00garbage", ("unreadable manifest",)),
                       (good.replace(b'"iteration": 6', b'"iteration": "four"'), ("damaged manifest", "iteration"))):
        m.write_bytes(bad)
        r = _pretrain(_flags(corpus, load=ckpt, save=ckpt))
        _refused(r, *words)
        r = _python(EXPORT, "--load", ckpt, "--output", ckpt.parent / "hf")
        _refused(r, *words)
    m.write_bytes(good)


def test_a_dataset_changed_under_its_prefix_is_refused(corpus, reference_run, tmp_path):
    """D5: the training data re-made under the same prefix (documents appended) is refused on
    resume, naming the dataset and the flag that accepts it; with --accept-changed-data the
    run continues from sample 0 of the changed dataset."""
    from sat_dist.data.indexed import IndexedDatasetReader, IndexedDatasetWriter

    data = tmp_path / "data"
    data.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus["data"] + suffix, data / f"stdlib{suffix}")
    for extra in Path(corpus["data"]).parent.glob("stdlib*"):
        if extra.suffix not in (".bin", ".idx"):
            shutil.copy(extra, data / extra.name)
    prefix = str(data / "stdlib")
    ckpt = tmp_path / "ckpt"
    r = _pretrain(_flags(corpus, **{"data-path": prefix, "save": ckpt, "exit-interval": 2}))
    assert r.returncode == 0, r.stderr[-3000:]
    src = IndexedDatasetReader(prefix)
    docs = [np.array(src[i]) for i in range(len(src))]
    dtype = src.tokens.dtype
    del src
    with IndexedDatasetWriter(prefix, dtype) as w:  # the same corpus and two more documents
        for doc in docs + docs[:2]:
            w.add_document(doc)
        w.finalize()
    before = digest(ckpt)
    r = _pretrain(_flags(corpus, **{"data-path": prefix, "load": ckpt, "save": ckpt}))
    _refused(r, f"dataset {prefix} changed since the checkpoint", "--accept-changed-data", "--finetune")
    assert digest(ckpt) == before
    r = _pretrain(_flags(corpus, **{"data-path": prefix, "load": ckpt, "save": ckpt, "accept-changed-data": True,
                                    "exit-interval": 3}))
    assert r.returncode == 0 and "starts again at sample 0" in r.stdout, r.stderr[-3000:]


def test_save_naming_a_file_is_refused_before_training(corpus, tmp_path):
    """D11 and the minor flag errors: --save naming (or lying under) an existing file, and
    --tensorboard-dir naming one, are refused at start-up, naming the flag."""
    f = tmp_path / "a_file"
    f.write_text("precious\n")
    for flags, words in (({"save": f}, ("--save", "an existing file")),
                         ({"save": f / "sub"}, ("--save", "lies under")),
                         ({"tensorboard-dir": f}, ("--tensorboard-dir", "an existing file"))):
        t0 = time.time()
        r = _pretrain(_flags(corpus, **flags))
        _refused(r, *words)
        assert time.time() - t0 < 60
    assert f.read_text() == "precious\n"


def test_a_run_that_ends_non_finite_exits_non_zero(corpus, tmp_path):
    """The last step non-finite (fewer than --max-nonfinite-steps): no final checkpoint can be
    written, and the run says so and exits 2 instead of 0."""
    ckpt = tmp_path / "ckpt"
    r = _pretrain(_flags(corpus, save=ckpt, lr="1e30", **{"min-lr": 0, "lr-warmup-iters": 0, "train-iters": 3,
                                                          "save-interval": 1, "max-nonfinite-steps": 5,
                                                          "global-batch-size": 4}))
    _refused(r, "non-finite", "no checkpoint was written at iteration 3")
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"


def _wait_for(proc, path: Path, text: str, timeout: float = 240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} in {path} after {timeout} s")


def _workers_of(tag: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_launcher_saves_and_leaves_no_orphans(corpus, tmp_path, launcher):
    """D6: SIGTERM to the launcher process itself (what `kill PID` or a job manager does):
    every rank saves at the next step boundary and exits; no worker trains on orphaned."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "out.log"
    tag = f"sigterm-{launcher}-{os.getpid()}"
    flags = _flags(corpus, save=ckpt, **{"train-iters": 400, "tensorboard-dir": tmp_path / tag})
    port = str(_port())
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, PRETRAIN, *flags]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", port, PRETRAIN, *flags]
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
        try:
            _wait_for(p, log, "iteration        3/")
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=120)
            t0 = time.time()
            while _workers_of(tag) and time.time() - t0 < 120:
                time.sleep(0.5)
            assert not _workers_of(tag), "a worker outlived its launcher"
        finally:
            if p.poll() is None:
                p.kill()
            for pid in _workers_of(tag):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert ("preempted (SIGTERM)" if launcher == "torchrun" else "preempted (the deepspeed launcher exited)") in text, \
        text[-3000:]
    it = int((ckpt / "latest").read_text().strip().split("_")[1])
    assert 3 <= it < 400
    assert (ckpt / f"iter_{it:07d}" / "sat_dist.json").is_file()


def test_ctrl_c_saves_at_the_step_boundary(corpus, tmp_path):
    """SIGINT (Ctrl-C) as SIGTERM: a checkpoint at the next step boundary, exit 0."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "out.log"
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, PRETRAIN, *_flags(corpus, save=ckpt, **{"train-iters": 400})],
                             stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            _wait_for(p, log, "iteration        2/")
            p.send_signal(signal.SIGINT)
            assert p.wait(timeout=120) == 0
        finally:
            if p.poll() is None:
                p.kill()
    assert "preempted (SIGINT)" in log.read_text()
    assert (ckpt / "latest").is_file()


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_bad_input_is_one_error(corpus, tmp_path, workers):
    """D7, D8: a lone surrogate in a JSON string, and --output-prefix under a regular file."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "bad \\ud800 here"}\n')
    out = tmp_path / "out" / "data"
    r = _python(PREPROCESS, "--input", src, "--output-prefix", out, "--tokenizer-model", corpus["tok"],
                "--workers", workers)
    _refused(r, "lone surrogate", "--skip-undecodable")
    assert r.stderr.count("error:") == 1
    assert not (tmp_path / "out" / "data.bin").exists()
    r = _python(PREPROCESS, "--input", src, "--output-prefix", out, "--tokenizer-model", corpus["tok"],
                "--workers", workers, "--skip-undecodable")
    assert r.returncode == 0, r.stderr[-2000:]
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    r = _python(PREPROCESS, "--input", src, "--output-prefix", blocker / "data", "--tokenizer-model",
                corpus["tok"], "--workers", workers)
    _refused(r, "--output-prefix", "an existing file")
    assert blocker.read_text() == "x"


def test_export_bad_output_and_full_disk_leave_nothing(ckpt, tmp_path):
    """D9, D10: --output an existing file is refused; a full disk mid-export leaves no
    directory that looks like a model (the export is written aside and renamed at the end)."""
    f = tmp_path / "file"
    f.write_text("x")
    _refused(_python(EXPORT, "--load", ckpt, "--output", f), "--output", "existing file")
    assert f.read_text() == "x"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "hf"
    r = _python(EXPORT, "--load", ckpt, "--output", out, preexec_fn=small_files)
    _refused(r, "--output", "cannot write", "nothing was left")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]
    r = _python(EXPORT, "--load", ckpt, "--output", out)
    assert r.returncode == 0 and (out / "config.json").is_file() and (out / "model.safetensors").is_file()

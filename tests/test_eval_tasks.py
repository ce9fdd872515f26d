"""--eval-tasks (lm-evaluation-harness on the model being trained) and W&B logging.

References are independent of sat_dist's scoring: transformers' LlamaForCausalLM on the same
weights, scored by hand, and the harness's own `hf` backend (HFLM) on the same weights and
tokenizer. The task is the small local multiple-choice set in tests/eval_tasks (JSONL in the
harness's YAML format); nothing is downloaded (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE).
"""

import json
import os
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("wandb")

from sat_dist.config import ModelConfig  # noqa: E402
from sat_dist.data.indexed import IndexedDatasetWriter, token_dtype  # noqa: E402
from sat_dist.data.tokenizer import document_ids, load_tokenizer  # noqa: E402
from sat_dist.errors import SatDistError  # noqa: E402
from sat_dist.train.arguments import MODEL_CONFIG_DIR  # noqa: E402
from tests.dist_harness import run_ranks  # noqa: E402
from tests.launchers import REPO, _env, _flags, scalars, torchrun  # noqa: E402

TASKS = str(REPO / "tests" / "eval_tasks")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub, and a datasets cache of the module's own."""
    saved = {k: os.environ.get(k) for k in (*OFFLINE, "HF_DATASETS_CACHE")}
    os.environ.update(OFFLINE, HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf_datasets")))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer.json (BOS added by its post-processor, as Llama's) that both
    sat_dist and transformers read, and a corpus tokenized with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("bpe")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:24]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(f) for f in files], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    ours = load_tokenizer(d / "tokenizer.json")
    with IndexedDatasetWriter(d / "stdlib", token_dtype(ours.vocab_size)) as w:
        for f in files:
            w.add_document(document_ids(ours, f.read_text()))
        w.finalize()
    return {"dir": d, "tok": str(d / "tokenizer.json"), "data": str(d / "stdlib")}


def _hf_tokenizer(bpe):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bpe["dir"]))


def _hflm(model_dir, bpe):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), tokenizer=_hf_tokenizer(bpe), device="cpu", batch_size=4,
                dtype="float32")


def _task_requests():
    """The local task's loglikelihood requests (lm-eval's Instances), and rolling ones: one
    text longer than the model's 512 positions (several windows) and a short one."""
    from lm_eval.api.instance import Instance

    from sat_dist.eval.tasks import load_eval_tasks

    tasks = load_eval_tasks(["sat_tiny_mc"], TASKS, None)
    task = tasks.loaded["tasks"]["sat_tiny_mc"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    ll = [i for i in task.instances if i.request_type == "loglikelihood"]
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:3000]
    roll = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(s,), idx=0)
            for s in (text, "def f(x):\n    return x + 1\n")]
    return ll, roll


def _score_worker(rank, world, tp, hf_sd, tok, ll, roll, token_reqs):
    from sat_dist.config import SATConfig, TrainConfig
    from sat_dist.eval.harness_adapter import SatDistLM
    from sat_dist.parallel.state import init_distributed
    from sat_dist.train.engine import build_engine, deepspeed_config

    comm = init_distributed(tp)
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    t = TrainConfig(micro_batch_size=2, seq_length=64, train_iters=1, lr_warmup_iters=0,
                    ds_config=str(REPO / "configs" / "ds_zero3.json")).validate()
    eng = build_engine(cfg, SATConfig(schedule="dense").validate(), t, comm, hf_sd, deepspeed_config(t, comm.dp_size))
    lm = SatDistLM(eng, comm, load_tokenizer(tok), cfg.max_position_embeddings, tokens_per_batch=256)
    return lm.loglikelihood(ll), lm.loglikelihood_rolling(roll), lm._loglikelihood_tokens(token_reqs)


def _by_hand(model, hf_tok, ll):
    """log p(continuation | context) from transformers' logits, with the harness's split of
    the tokens (the context's own encoding; the continuation is the rest of the whole's)."""
    out = []
    with torch.no_grad():
        for inst in ll:
            ctx, cont = inst.args
            whole, head = hf_tok.encode(ctx + cont), hf_tok.encode(ctx)
            n = len(whole) - len(head)
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
            picked = logp[-n:].gather(-1, torch.tensor(whole[-n:])[:, None])
            out.append((float(picked.sum()), bool((logp[-n:].argmax(-1) == torch.tensor(whole[-n:])).all())))
    return out


def _greedy_requests(model, hf_tok, ll):
    """Token-level requests whose continuation is transformers' greedy choice (is_greedy must
    be True), each followed by the same with its last token changed (False): a random model
    never picks a task's answer greedily."""
    reqs = []
    with torch.no_grad():
        for inst in ll[:16:4]:
            ctx = hf_tok.encode(inst.args[0])
            cont = []
            for _ in range(3):
                cont.append(int(model(torch.tensor([ctx + cont])).logits[0, -1].argmax()))
            reqs += [(None, ctx, cont), (None, ctx, cont[:-1] + [(cont[-1] + 1) % 1000])]
    return reqs


# --- a tiny multi-rank training run with --eval-tasks and W&B (offline) -------------------

def _read_wandb(run_dir: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of an offline W&B run, read from its .wandb file
    (LevelDB's log format: 32 KiB blocks of records with 7-byte headers, after W&B's 7-byte
    file header; each record one protobuf Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (f,) = run_dir.glob("run-*.wandb")
    data, block = f.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    run_id, config, rows = None, {}, []
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return run_id, config, rows


@pytest.fixture(scope="module")
def trained(bpe, tmp_path_factory):
    """TP1 x DP2 to iteration 3 (--exit-interval), evaluating the task every 2 steps and at
    the end, logging to W&B offline; then a resume at TP2 x DP1 to iteration 4."""
    d = tmp_path_factory.mktemp("eval_run")
    corpus = {"data": bpe["data"], "tok": bpe["tok"]}
    flags = _flags(corpus, **{"train-iters": 4, "save": d / "ckpt", "save-interval": 2, "tensorboard-dir": d / "tb",
                              "eval-tasks": "sat_tiny_mc", "eval-tasks-path": TASKS, "eval-tasks-interval": 2,
                              "wandb-project": "sat-dist-test", "wandb-exp-name": "tiny", "lr": 3e-3})
    env = dict(OFFLINE, WANDB_MODE="offline", HF_DATASETS_CACHE=str(d / "hf_datasets"))
    first = torchrun(2, flags + ["--exit-interval", "3"], env=env)
    second = torchrun(2, flags + ["--load", str(d / "ckpt"), "--tensor-model-parallel-size", "2"], env=env)
    return {"dir": d, "out": [first.stdout, second.stdout]}


def test_run_evaluates_tasks_on_schedule_and_writes_results(trained):
    d = trained["dir"]
    acc = scalars(d / "tb", "eval/sat_tiny_mc/acc")
    assert sorted(acc) == [2, 3, 4]  # every 2 steps, the end of each launch, not twice at 4
    assert sorted(scalars(d / "tb", "eval/sat_tiny_mc/acc_norm")) == [2, 3, 4]
    assert sorted(scalars(d / "tb", "eval/sat_tiny_mc/acc_stderr")) == [2, 3, 4]
    assert all(v > 0 for v in scalars(d / "tb", "eval-tasks-time").values())
    files = sorted(p.name for p in (d / "ckpt" / "eval_tasks").iterdir())
    assert files == ["iter_0000002.json", "iter_0000003.json", "iter_0000004.json"]
    rec = json.loads((d / "ckpt" / "eval_tasks" / "iter_0000004.json").read_text())
    assert rec["iteration"] == 4 and rec["consumed_samples"] == 32 and rec["tasks"] == ["sat_tiny_mc"]
    assert rec["results"]["sat_tiny_mc"]["acc,none"] == pytest.approx(acc[4])
    assert rec["n-samples"]["sat_tiny_mc"]["effective"] == 16
    out = trained["out"][0]
    assert " downstream evaluation at iteration 2 | sat_tiny_mc/acc: " in out
    # evaluation comes after the step's line, and the next step's time does not include it
    assert out.index(" iteration        2/") < out.index(" downstream evaluation at iteration 2 ")


@pytest.fixture(scope="module")
def exported(trained):
    """The run's last checkpoint (iteration 4) as an HF directory, by tools/export_hf.py."""
    d = trained["dir"]
    r = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), "--load", str(d / "ckpt"),
                        "--output", str(d / "hf4")], capture_output=True, text=True, cwd=REPO, env=_env())
    assert r.returncode == 0, r.stderr
    return d / "hf4"


def test_scores_equal_the_harness_hf_backend_on_the_exported_checkpoint(trained, exported, bpe):
    """The in-run evaluation at iteration 4 (TP 2) scored what `lm-eval --model hf` scores on
    tools/export_hf.py's export of that checkpoint."""
    from lm_eval.evaluator import evaluate

    from sat_dist.eval.tasks import load_eval_tasks

    res = evaluate(lm=_hflm(exported, bpe), task_dict=load_eval_tasks(["sat_tiny_mc"], TASKS, None).loaded,
                   bootstrap_iters=0, log_samples=False)["results"]["sat_tiny_mc"]
    rec = json.loads((trained["dir"] / "ckpt" / "eval_tasks" / "iter_0000004.json").read_text())
    rec = rec["results"]["sat_tiny_mc"]
    assert rec["acc,none"] == res["acc,none"] and rec["acc_norm,none"] == res["acc_norm,none"]


def test_adapter_scores_equal_transformers_and_the_harness_hf_backend(exported, bpe):
    """The adapter over the trained checkpoint's weights, in one process, at TP 2 and at DP 2
    (ZeRO-3), against transformers scoring them by hand and the harness's own hf backend,
    both on tools/export_hf.py's export."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    ll, roll = _task_requests()
    assert len(ll) == 64  # 16 questions x 4 choices
    model = LlamaForCausalLM.from_pretrained(exported).float().eval()
    hf_tok = _hf_tokenizer(bpe)
    greedy = _greedy_requests(model, hf_tok, ll)
    hf_sd = load_file(exported / "model.safetensors")
    one = run_ranks(1, _score_worker, 1, hf_sd, bpe["tok"], ll, roll, greedy)[0]
    tp2 = run_ranks(2, _score_worker, 2, hf_sd, bpe["tok"], ll, roll, greedy)
    dp2 = run_ranks(2, _score_worker, 1, hf_sd, bpe["tok"], ll, roll, greedy)

    hand = _by_hand(model, hf_tok, ll)
    hflm = _hflm(exported, bpe)
    backend_ll, backend_roll = hflm.loglikelihood(ll), hflm.loglikelihood_rolling(roll)
    backend_greedy = hflm._loglikelihood_tokens(greedy)

    ours_ll, ours_roll, ours_greedy = one
    assert [g for _, g in ours_greedy] == [True, False] * 4 == [g for _, g in backend_greedy]
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours_greedy, backend_greedy)) < 2e-4
    for ref in (hand, backend_ll):
        assert [g for _, g in ours_ll] == [g for _, g in ref]
        assert max(abs(a - b) for (a, _), (b, _) in zip(ours_ll, ref)) < 2e-4
    assert max(abs(a - b) / abs(b) for a, b in zip(ours_roll, backend_roll)) < 1e-5
    assert min(len(i.args[1]) for i in ll) > 0 and len({round(lp, 3) for lp, _ in ours_ll}) > 40  # not degenerate
    for res in (*tp2, *dp2):  # every rank returns every result
        assert [g for _, g in res[0]] == [g for _, g in ours_ll]
        assert [g for _, g in res[2]] == [g for _, g in ours_greedy]
        assert max(abs(a - b) for (a, _), (b, _) in zip(res[0], ours_ll)) < 2e-4
        assert max(abs(a - b) / abs(b) for a, b in zip(res[1], ours_roll)) < 1e-5
    # DP only splits the same batches over the ranks: the same numbers
    assert dp2[0] == one and dp2[1] == one


def test_wandb_offline_logs_the_tensorboard_scalars_and_resumes_the_run(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = trained["dir"]
    runs = sorted((d / "ckpt" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one per launch
    (id1, config, rows1), (id2, _, rows2) = (_read_wandb(r) for r in runs)
    assert id1 == id2  # the resume continued the same W&B run (its id was in the manifest)
    manifest = json.loads((d / "ckpt" / "iter_0000004" / "sat_dist.json").read_text())
    assert manifest["wandb_run_id"] == id1
    assert config["flags"]["eval_tasks"] == ["sat_tiny_mc"] and config["sat"]["schedule"] == "ladder"
    assert config["deepspeed"]["zero_optimization"]["stage"] == 3 and config["deepspeed"]["train_batch_size"] == 8
    logged: dict = {}
    for row in rows1 + rows2:
        for k, v in row.items():
            if not k.startswith("_") and k != "iteration":
                logged[(k, row["iteration"])] = v
    ea = EventAccumulator(str(d / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tb = {(tag, e.step): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)}
    assert set(logged) == set(tb)
    assert {k for k, _ in tb} >= {"lm loss", "eval/sat_tiny_mc/acc", "iteration-time", "eval-tasks-time"}
    for key, v in tb.items():
        assert logged[key] == pytest.approx(v, rel=1e-6, abs=1e-6), key  # TensorBoard keeps float32


# --- start-up checks: one line, before any rank starts ---------------------------------

def _plan_flags(bpe, tmp_path, *extra):
    return ["--model-config", "tiny-test", "--data-path", bpe["data"], "--tokenizer-model", bpe["tok"],
            "--save", str(tmp_path / "ckpt"), "--tensorboard-dir", str(tmp_path / "tb"), *extra]


def test_task_without_its_data_fails_before_training_with_one_line(bpe, tmp_path, capsys):
    """The entry point's exit status, one line naming the task and the fix, nothing written."""
    from sat_dist.train.main import main

    own = tmp_path / "tasks"
    own.mkdir()
    yaml = (REPO / "tests" / "eval_tasks" / "sat_tiny_mc.yaml").read_text()
    (own / "gone.yaml").write_text(yaml.replace("task: sat_tiny_mc", "task: gone_mc")
                                   .replace("sat_tiny_mc.jsonl", "gone.jsonl"))
    rc = main(_plan_flags(bpe, tmp_path, "--eval-tasks", "gone_mc", "--eval-tasks-path", str(own)))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: --eval-tasks gone_mc: its data file is missing"), err
    assert "data_files relative to the YAML's directory" in lines[0]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "tb").exists()


def test_unknown_task_or_uncached_data_is_named_with_the_fix(bpe, tmp_path):
    from sat_dist.train.main import plan_run

    with pytest.raises(SatDistError) as e:
        plan_run(_plan_flags(bpe, tmp_path, "--eval-tasks", "sat_tiny_mcq", "--eval-tasks-path", TASKS))
    msg = str(e.value)
    assert msg.startswith("--eval-tasks sat_tiny_mcq: not a task") and "did you mean sat_tiny_mc?" in msg
    # a task of the harness whose data is not in the (empty) cache: offline, named with the fix
    with pytest.raises(SatDistError) as e:
        plan_run(_plan_flags(bpe, tmp_path, "--eval-tasks", "arc_easy", "--eval-tasks-path", TASKS))
    msg = str(e.value)
    assert msg.startswith("--eval-tasks arc_easy: its data (allenai/ai2_arc, ARC-Easy) is not in the datasets cache")
    assert "datasets.load_dataset('allenai/ai2_arc', 'ARC-Easy')" in msg and "--eval-tasks-path" in msg
    assert not (tmp_path / "ckpt").exists()


def test_missing_packages_name_the_extra(bpe, tmp_path, monkeypatch):
    import importlib.util

    from sat_dist.train.main import plan_run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("lm_eval", "wandb")
                        else real(name, *a))
    with pytest.raises(SatDistError, match=r"--eval-tasks needs the lm_eval package, which is not installed: "
                                           r"pip install 'sat_dist\[eval\]'"):
        plan_run(_plan_flags(bpe, tmp_path, "--eval-tasks", "sat_tiny_mc", "--eval-tasks-path", TASKS))
    with pytest.raises(SatDistError, match=r"--wandb-project needs the wandb package.*sat_dist\[wandb\]"):
        plan_run(_plan_flags(bpe, tmp_path, "--wandb-project", "p"))


@pytest.mark.parametrize("flags, msg", [
    (["--eval-tasks-limit", "5"], "--eval-tasks-limit needs --eval-tasks"),
    (["--eval-tasks", "sat_tiny_mc", "--eval-tasks-limit", "0"], "--eval-tasks-limit: got 0; allowed: an integer >= 1"),
    (["--eval-tasks", "sat_tiny_mc", "--eval-tasks-interval", "-1"], "--eval-tasks-interval: got -1"),
    (["--wandb-exp-name", "x"], "--wandb-exp-name needs --wandb-project"),
])
def test_bad_eval_and_wandb_flags(flags, msg):
    from sat_dist.train.arguments import parse_args

    with pytest.raises(SatDistError, match=msg):
        parse_args(flags)


def test_manifest_wandb_run_id_is_optional_and_checked(trained, tmp_path):
    """Checkpoints from before the field load as they did; a field of the wrong type is a
    damaged manifest, named."""
    from sat_dist.checkpoint.state import MANIFEST, read_manifest

    good = json.loads((trained["dir"] / "ckpt" / "iter_0000004" / MANIFEST).read_text())
    for name, edit in (("old", lambda m: m.pop("wandb_run_id")), ("bad", lambda m: m.update(wandb_run_id=7))):
        m = dict(good)
        edit(m)
        (tmp_path / name / "iter_0000004").mkdir(parents=True)
        (tmp_path / name / "iter_0000004" / MANIFEST).write_text(json.dumps(m))
    assert "wandb_run_id" not in read_manifest(tmp_path / "old", "iter_0000004")
    with pytest.raises(SatDistError, match=r"damaged manifest \(wandb_run_id is 7, not a non-empty string\)"):
        read_manifest(tmp_path / "bad", "iter_0000004")

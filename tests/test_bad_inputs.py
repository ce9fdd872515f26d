"""A catalog of malformed inputs to the training entry point (sat_dist.train.main, which
launch/pretrain.py runs): each gives exactly one line on stderr naming the problem, a
non-zero exit, no traceback, and leaves everything on disk as it was.

(A full disk during a save is in test_faults.py; damaged indexed files and tokenizers are also
covered at the library level in test_data.py.)
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sat_dist.data.indexed import IndexedDatasetWriter
from tests.launchers import digest


@pytest.fixture(scope="module")
def ws(corpus, reference_run, hf_init, tmp_path_factory):
    """A workspace of good and broken inputs (and a real checkpoint) to point the flags at."""
    w = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(reference_run[0] / "ckpt", w / "ckpt")
    data = Path(corpus["data"])
    for suffix in (".bin", ".idx"):
        shutil.copy(str(data) + suffix, w / f"good{suffix}")
        shutil.copy(str(data) + suffix, w / f"truncated{suffix}")
        shutil.copy(str(data) + suffix, w / f"float{suffix}")
    shutil.copy(str(data) + ".doclast.npz", w / "good.doclast.npz")  # its document index (sat_dist.data.doc_ends)
    with open(w / "truncated.bin", "r+b") as f:
        f.truncate(1000)
    idx = bytearray((w / "float.idx").read_bytes())
    idx[17] = 7  # dtype code after the 9-byte magic and 8-byte version: float32
    (w / "float.idx").write_bytes(bytes(idx))
    (w / "empty.bin").write_bytes(b"")
    (w / "empty.idx").write_bytes(b"")
    sets = {"one_sample": [5] * 100, "few_tokens": [5] * 10, "big_ids": [5] * 99 + [5000] + [5] * 100}
    for name, tokens in sets.items():
        with IndexedDatasetWriter(w / name, "uint16") as iw:  # validation sets
            iw.add_document(tokens)
            iw.finalize()
    (w / "garbage.model").write_bytes(b"\x00not a sentencepiece model" * 10)
    shutil.copy(corpus["tok"], w / "tok.model")

    def hf_variant(name, edit=None, config_edit=None):
        d = w / name
        shutil.copytree(hf_init, d)
        if edit is not None:
            sd = load_file(str(d / "model.safetensors"))
            edit(sd)
            save_file(sd, str(d / "model.safetensors"))
        if config_edit is not None:
            cfg = json.loads((d / "config.json").read_text())
            config_edit(cfg)
            (d / "config.json").write_text(json.dumps(cfg))

    hf_variant("hf_missing", lambda sd: sd.pop("model.layers.0.self_attn.k_proj.weight"))
    hf_variant("hf_shape", lambda sd: sd.__setitem__("model.layers.1.mlp.down_proj.weight", torch.zeros(64, 100)))
    hf_variant("hf_dtype", lambda sd: sd.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int64)))
    hf_variant("hf_small_vocab", lambda sd: [sd.__setitem__(k, sd[k][:500]) for k in
                                            ("model.embed_tokens.weight", "lm_head.weight")],
               lambda c: c.__setitem__("vocab_size", 500))
    hf_variant("hf_good")
    hf_variant("hf_rope_scaled", config_edit=lambda c: c.__setitem__(
        "rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0}))
    hf_variant("hf_bias", lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    hf_variant("hf_noconfig")
    (w / "hf_noconfig" / "config.json").unlink()
    (w / "bad.yaml").write_text("seq-length: [1, 2\n")
    (w / "bad.json").write_text('{"seq-length": 64,}')
    (w / "unknown.json").write_text('{"seq-lenght": 64}')
    (w / "wrongtype.yaml").write_text("seq-length: long\n")
    (w / "list.yaml").write_text("- seq-length\n")
    (w / "ds_bad.json").write_text('{"zero_optimization": {"stage": 3},')
    (w / "ds_stage5.json").write_text('{"zero_optimization": {"stage": 5}}')
    (w / "ds_batch.json").write_text('{"zero_optimization": {"stage": 3}, "train_batch_size": 999}')
    (w / "ds_fp16.json").write_text('{"zero_optimization": {"stage": 3}, "fp16": {"enabled": true}}')
    (w / "ds_sgd.json").write_text('{"zero_optimization": {"stage": 3}, "optimizer": {"type": "SGD"}}')
    (w / "ds_lr.json").write_text('{"zero_optimization": {"stage": 3}, '
                                  '"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}')
    (w / "ds_bf16.json").write_text('{"zero_optimization": {"stage": 3}, "bf16": {"enabled": true}}')
    (w / "ds_sched.json").write_text('{"zero_optimization": {"stage": 3}, "scheduler": {"type": "WarmupLR"}}')
    (w / "small_vocab_model.json").write_text(json.dumps({
        "name": "small-vocab", "hidden_size": 64, "ffn_hidden_size": 128, "num_layers": 1,
        "num_attention_heads": 4, "num_query_groups": 4, "vocab_size": 500}))
    (w / "incomplete").mkdir()
    (w / "incomplete" / "latest").write_text("iter_0000009\n")
    (w / "incomplete" / "iter_0000009").mkdir()
    return w


def _argv(ws, **over):
    f = {"model-config": "tiny-test", "data-path": ws / "good", "tokenizer-model": ws / "tok.model",
         "seq-length": 64, "micro-batch-size": 2, "global-batch-size": 4, "train-iters": 2,
         "sat-align-mlp": 16, "split": "90,10,0", "save": ws / "new_ckpt"}
    extra = over.pop("_extra", [])
    f.update(over)
    out = []
    for k, v in f.items():
        if v is not None:
            out += [f"--{k}", str(v)]
    return out + extra


CASES = [
    # flags and values
    ("bad choice", {"sat-metric": "l2"}, "invalid choice: 'l2'"),
    ("rate out of range", {"sat-omission-mlp": 1.5}, "sat.omission_mlp: got 1.5; allowed: a number in [0, 1)"),
    ("zero temperature", {"sat-temperature": 0}, "sat.temperature: got 0.0"),
    ("zero micro batch", {"micro-batch-size": 0}, "--micro-batch-size: got 0"),
    ("negative lr", {"lr": -1}, "--lr: got -1.0"),
    ("min-lr above lr", {"min-lr": 1.0}, "--min-lr 1.0 is larger than --lr"),
    ("unknown model", {"model-config": "llama3"}, "--model-config llama3: unknown model"),
    ("tp does not divide heads", {"tensor-model-parallel-size": 3}, "does not divide num_attention_heads=4"),
    ("unknown flag", {"_extra": ["--sequence-length", "64"]}, "unrecognized arguments: --sequence-length"),
    ("not an int", {"seq-length": "abc"}, "argument --seq-length: invalid int value: 'abc'"),
    ("batch not divisible", {"global-batch-size": 3}, "--global-batch-size 3 is not a multiple"),
    ("backward-only with attention omission", {"sat-sparse-pass": "backward", "sat-omission-attn": 0.2},
     "--sat-sparse-pass backward: omits MLP channels only"),
    ("backward-only with compensation", {"sat-sparse-pass": "backward", "sat-compensation": "mean"},
     "nothing for --sat-compensation mean to make up"),
    ("per-layer rates off their mean", {"sat-omission-mlp-layers": "0,0.5"},
     "the rates' mean is 0.2500 but --sat-omission-mlp is 0.1; set --sat-omission-mlp 0.2500"),
    ("per-layer rates for too few layers", {"sat-omission-mlp-layers": "0.3", "sat-omission-mlp": 0.3},
     "--sat-omission-mlp-layers: 1 rates for a model of 2 layers"),
    ("comm-sparse where it cannot run", {"sat-comm-sparse": "on", "sat-compensation": "mean"},
     "--sat-comm-sparse on: cannot run because --sat-compensation mean reads the omitted rows; use "
     "--sat-comm-sparse auto or off"),
    ("comm-sparse not a choice", {"sat-comm-sparse": "yes"}, "argument --sat-comm-sparse: invalid choice"),
    ("zero collective timeout", {"distributed-timeout-minutes": 0}, "--distributed-timeout-minutes: got 0"),
    ("negative peak", {"peak-tflops": -5}, "--peak-tflops: got -5.0; allowed: a finite number > 0"),
    ("negative retention", {"keep-latest-k": -1}, "--keep-latest-k: got -1; allowed: an integer >= 0"),
    # --config files
    ("yaml syntax", {"config": "{ws}/bad.yaml"}, "not valid YAML"),
    ("json syntax", {"config": "{ws}/bad.json"}, "not valid JSON"),
    ("config unknown key", {"config": "{ws}/unknown.json"}, "unknown key 'seq-lenght'"),
    ("config wrong type", {"config": "{ws}/wrongtype.yaml"}, "seq-length: got 'long'; expected int"),
    ("config not a mapping", {"config": "{ws}/list.yaml"}, "expected a mapping"),
    ("config missing", {"config": "{ws}/nope.yaml"}, "--config {ws}/nope.yaml: file not found"),
    # DeepSpeed configs
    ("ds missing", {"ds_config": "{ws}/nope.json"}, "--ds_config {ws}/nope.json: file not found"),
    ("ds syntax", {"ds_config": "{ws}/ds_bad.json"}, "invalid JSON"),
    ("ds stage", {"ds_config": "{ws}/ds_stage5.json"}, "zero_optimization.stage: got 5"),
    ("ds contradicts flags", {"ds_config": "{ws}/ds_batch.json"}, "train_batch_size=999 contradicts the flags (4)"),
    ("ds fp16", {"ds_config": "{ws}/ds_fp16.json"}, "fp16 is not supported; use --bf16"),
    ("ds optimizer", {"ds_config": "{ws}/ds_sgd.json"}, "optimizer.type 'SGD'"),
    ("ds lr contradicts --lr", {"ds_config": "{ws}/ds_lr.json"}, "optimizer.params.lr=0.1 contradicts the flags"),
    ("ds bf16 contradicts flags", {"ds_config": "{ws}/ds_bf16.json"}, "bf16.enabled=True contradicts the flags"),
    ("ds scheduler", {"ds_config": "{ws}/ds_sched.json"}, "has a scheduler"),
    # data
    ("data missing", {"data-path": "{ws}/nope"}, "nope"),
    ("data truncated", {"data-path": "{ws}/truncated"}, "truncated"),
    ("data float dtype", {"data-path": "{ws}/float"}, "float32"),
    ("data empty", {"data-path": "{ws}/empty"}, "empty"),
    ("split without train", {"split": "0,1"}, "data.split: got '0,1'"),
    # blends
    ("blend odd values", {"data-path": None, "_extra": ["--data-path", "0.5", "{ws}/good", "0.5"]}, "got 3 values"),
    ("blend weight not a number", {"data-path": None, "_extra": ["--data-path", "x", "{ws}/good", "1", "{ws}/float"]},
     "weight 'x' of {ws}/good is not a number"),
    ("blend zero weight", {"data-path": None, "_extra": ["--data-path", "0", "{ws}/good", "1", "{ws}/float"]},
     "weight 0 of {ws}/good: allowed: a finite number > 0"),
    ("blend dataset twice", {"data-path": None, "_extra": ["--data-path", "1", "{ws}/good", "1", "{ws}/good"]},
     "{ws}/good appears twice"),
    ("blend member missing", {"data-path": None, "_extra": ["--data-path", "1", "{ws}/good", "1", "{ws}/nope"]},
     "--data-path {ws}/nope: {ws}/nope.idx: file not found"),
    ("data and train data", {"_extra": ["--train-data-path", "{ws}/good"]},
     "--data-path and --train-data-path: give one"),
    # flags that need data of one's own (they were silently ignored by the embedded default job)
    ("tokenizer without data", {"data-path": None}, "--tokenizer-model {ws}/tok.model is the tokenizer of --data-path"),
    ("hf checkpoint without data", {"data-path": None, "tokenizer-model": None, "model-config": None,
                                    "hf-checkpoint": "{ws}/hf_good"}, "needs data tokenized with its tokenizer"),
    # validation sets
    ("valid set missing", {"_extra": ["--valid-data-path", "code={ws}/nope"]},
     "--valid-data-path code={ws}/nope: {ws}/nope.idx: file not found"),
    ("valid set empty name", {"_extra": ["--valid-data-path", "={ws}/good"]}, "empty name before '='"),
    ("valid set empty prefix", {"_extra": ["--valid-data-path", "code="]}, "'code=': no dataset prefix after '='"),
    ("valid set name twice", {"_extra": ["--valid-data-path", "a={ws}/good", "a={ws}/one_sample"]},
     "got the name 'a' twice"),
    ("valid set two bare prefixes", {"_extra": ["--valid-data-path", "{ws}/good", "{ws}/one_sample"]},
     "got two prefixes without a name"),
    ("valid set name not a tag", {"_extra": ["--valid-data-path", "my code={ws}/good"]}, "may hold only letters"),
    ("valid set below one micro-batch", {"_extra": ["--valid-data-path", "code={ws}/one_sample"]},
     "code={ws}/one_sample: 1 sample of 64 tokens, fewer than one micro-batch per DP rank (2 x DP 1)"),
    ("valid set below one sample", {"_extra": ["--valid-data-path", "{ws}/few_tokens"]},
     "--valid-data-path {ws}/few_tokens: {ws}/few_tokens: 11 tokens (EOS separators included), not one sample"),
    ("valid set of another tokenizer", {"_extra": ["--valid-data-path", "code={ws}/big_ids"]},
     "big_ids.bin: token id 5000 outside"),
    ("valid set without --data-path", {"data-path": None, "_extra": ["--valid-data-path", "code={ws}/good"]},
     "--valid-data-path needs --data-path"),
    # tokenizers
    ("tokenizer missing", {"tokenizer-model": "{ws}/nope.model"}, "nope.model"),
    ("tokenizer garbage", {"tokenizer-model": "{ws}/garbage.model"}, "garbage.model"),
    ("tokenizer larger than model", {"model-config": "{ws}/small_vocab_model.json"},
     "has 1000 tokens, more than the model's vocab_size 500"),
    # HF checkpoints
    ("hf no config", {"hf-checkpoint": "{ws}/hf_noconfig", "model-config": None}, "no config.json there"),
    ("hf missing tensor", {"hf-checkpoint": "{ws}/hf_missing", "model-config": None},
     "missing tensor model.layers.0.self_attn.k_proj.weight"),
    ("hf wrong shape", {"hf-checkpoint": "{ws}/hf_shape", "model-config": None},
     "model.layers.1.mlp.down_proj.weight has shape (64, 100), config.json implies (64, 128)"),
    ("hf wrong dtype", {"hf-checkpoint": "{ws}/hf_dtype", "model-config": None},
     "model.norm.weight has dtype torch.int64"),
    ("hf disagrees with model config", {"hf-checkpoint": "{ws}/hf_good", "model-config": "tiny"},
     "is of another model (ffn_hidden_size=768 vs 128"),
    ("hf rope scaling", {"hf-checkpoint": "{ws}/hf_rope_scaled", "model-config": None},
     "RoPE scaling (yarn) is not supported"),
    ("hf bias tensor", {"hf-checkpoint": "{ws}/hf_bias", "model-config": None},
     "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
    ("hf vocab smaller than tokenizer", {"hf-checkpoint": "{ws}/hf_small_vocab", "model-config": None},
     "more than the model's vocab_size 500"),
    # checkpoints
    ("checkpoint of another model", {"load": "{ws}/ckpt", "save": "{ws}/ckpt", "model-config": "tiny"},
     "is of another model (ffn_hidden_size=128 vs 768"),
    ("resume with another --lr", {"load": "{ws}/ckpt", "save": "{ws}/ckpt", "lr": 0.001},
     "was trained with --train-iters 6 (this run: 2)"),
    ("load without checkpoint", {"load": "{ws}/hf_missing"}, "no checkpoint there"),
    ("load incomplete", {"load": "{ws}/incomplete", "save": "{ws}/incomplete"}, "which is not a complete checkpoint"),
    ("save over checkpoints", {"save": "{ws}/ckpt"}, "already holds"),
    # LR schedule and stage flags (Megatron's)
    ("WSD without its decay iters", {"lr-decay-style": "WSD"}, "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    ("WSD decay longer than the decay", {"lr-decay-style": "WSD", "lr-wsd-decay-iters": 5, "lr-warmup-iters": 0},
     "--lr-wsd-decay-iters: got 5; allowed: an integer in [0, --lr-decay-iters - --lr-warmup-iters] = [0, 2 - 0]"),
    ("decay iters below warmup", {"lr-decay-iters": 1, "lr-warmup-iters": 2},
     "--lr-decay-iters: got 1; allowed: an integer >= --lr-warmup-iters (2)"),
    ("warmup init above lr", {"lr-warmup-init": 0.01}, "--lr-warmup-init: got 0.01; allowed: a number in [0, --lr]"),
    ("stage flag without --load", {"_extra": ["--override-opt_param-scheduler"]},
     "--override-opt_param-scheduler: says how to load a checkpoint, but no --load is given"),
    ("finetune with override", {"load": "{ws}/ckpt", "_extra": ["--finetune", "--override-opt_param-scheduler"]},
     "--finetune with --override-opt_param-scheduler: contradictory"),
    ("finetune over its own checkpoints", {"load": "{ws}/ckpt", "save": "{ws}/ckpt", "_extra": ["--finetune"]},
     "drop --finetune to resume the stage from its own checkpoints"),
    ("resume with another --lr names the override", {"load": "{ws}/ckpt", "save": "{ws}/ckpt", "train-iters": 6,
                                                    "lr": 0.001}, "pass --override-opt_param-scheduler"),
    ("override with another data order", {"load": "{ws}/ckpt", "save": "{ws}/ckpt", "train-iters": 8, "seed": 7,
                                          "_extra": ["--override-opt_param-scheduler"]},
     "--seed 1234 (this run: 7); --override-opt_param-scheduler lets the LR schedule"),
    ("override to fewer iterations than done", {"load": "{ws}/ckpt", "save": "{ws}/ckpt", "lr": 0.001,
                                                "_extra": ["--override-opt_param-scheduler"]},
     "--train-iters: got 2; allowed: more than the checkpoint's iteration 6"),
]


def test_catalog_of_bad_inputs(ws, capsys):
    from sat_dist.train.main import main

    assert len(CASES) >= 25
    before = digest(ws)
    for name, over, msg in CASES:
        over = {k: (v.format(ws=ws) if isinstance(v, str) else [x.format(ws=ws) for x in v] if isinstance(v, list)
                    else v) for k, v in over.items()}
        rc = main([str(a) for a in _argv(ws, **over)])
        err = capsys.readouterr().err.strip()
        msg = msg.format(ws=ws)
        assert rc != 0, name
        assert msg in err, (name, msg, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, (name, err)
    assert digest(ws) == before  # nothing overwritten, deleted or added

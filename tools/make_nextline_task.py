#!/usr/bin/env python
"""Build a next-line multiple-choice task per domain of the CPT experiment, from its held-out
documents only, in lm-evaluation-harness's YAML + JSONL format (docs/EVALUATION.md, "Offline
task data"). The runs score them with `--eval-tasks nextline_new,nextline_old
--eval-tasks-path DIR`.

An example is one position in a held-out document:
- context: the lines before it, as they stand in the document (indentation and blank lines
  kept), from at most --context-lines non-empty lines back and at most --context-chars
  characters (about 150 tokens at SmolLM2's 3.3-3.7 characters per token on these sets);
- the correct choice: the next non-empty line, which must be non-trivial (at least
  --min-chars characters and --min-letters letters once stripped, at most --max-chars);
- 3 distractors: other non-trivial lines of the same document, drawn with the seed, each
  different (stripped) from the answer, from each other and from every line of the context.
Every choice carries the answer's indentation, so indentation alone does not give the answer
away: the model has to pick the line by its content. The harness joins context and choice
with a newline (`target_delimiter: "\\n"`); the answer's place among the 4 choices is drawn too.

Input: DATA/raw/{new,old}_heldout.jsonl ({"text": ...} a line, written by
tools/setup_cpt_experiment.py). Before using them the script checks, where the files are
there, that they are the held-out sets the runs evaluate and nothing of training:
- each document, tokenized with --tokenizer, is the matching document of the indexed
  DATA/{domain}_heldout (the same tokens, then EOS);
- no held-out document is also a document of DATA/raw/{domain}_train.jsonl;
- document counts and bytes agree with setup_summary.json beside DATA (whose names label the
  examples' `source`).

Output (default runs/cpt_setup/tasks/): nextline_{new,old}.jsonl (one {"context",
"choices", "label", "source", "line"} a line, in the order drawn: --eval-tasks-limit K takes
a random K of them) and nextline_{new,old}.yaml. The same arguments give the same files.

    python tools/make_nextline_task.py [--data runs/cpt_setup/data] [--out runs/cpt_setup/tasks] [-n 40]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("new", "old")
DESCRIBE = {"new": "Python standard library", "old": "Shakespeare"}

YAML = """\
# Next-line choice on the {describe} held-out documents of the CPT experiment (docs/EXPERIMENTS.md).
# Written by tools/make_nextline_task.py {argv}
# {n} examples; context: the preceding lines; choices: the true next line and 3 other lines of the
# same document, all at the answer's indentation, joined to the context by a newline.
task: nextline_{domain}
dataset_path: json
dataset_kwargs:
  data_files:
    test: nextline_{domain}.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_target: label
doc_to_choice: choices
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def nontrivial(line: str, min_chars: int, max_chars: int, min_letters: int) -> bool:
    s = line.strip()
    return min_chars <= len(s) <= max_chars and sum(c.isalpha() for c in s) >= min_letters


def indent_of(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def doc_examples(text: str, min_chars: int, max_chars: int, min_letters: int, context_lines: int,
                 context_chars: int, min_context: int) -> tuple[list[str], list[tuple[int, int]], list[str]]:
    """(lines, candidate (start, answer) line-index pairs, the document's distinct non-trivial
    stripped lines in order). A candidate's context is lines[start:answer]."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    pool: list[str] = []
    seen: set[str] = set()
    for line in lines:
        s = line.strip()
        if nontrivial(line, min_chars, max_chars, min_letters) and s not in seen:
            seen.add(s)
            pool.append(s)
    nonempty = [i for i, line in enumerate(lines) if line.strip()]
    cands = []
    for k, i in enumerate(nonempty):
        if k < min_context or not nontrivial(lines[i], min_chars, max_chars, min_letters):
            continue
        # drop whole lines from the front while over the character cap (at least one stays)
        before = nonempty[max(0, k - context_lines):k]
        while len(before) > 1 and len("\n".join(lines[before[0]:i])) > context_chars:
            before.pop(0)
        cands.append((before[0], i))
    return lines, cands, pool


def build(docs: list[tuple[str, str]], n: int, seed: int, domain: str, *, min_chars: int = 12,
          max_chars: int = 160, min_letters: int = 4, context_lines: int = 12, context_chars: int = 520,
          min_context: int = 3) -> list[dict]:
    """n examples drawn (without replacement, uniformly over all eligible positions of all
    documents) from `docs` [(source, text)]; deterministic in (docs, n, seed, domain, caps)."""
    rng = random.Random(f"nextline:{seed}:{domain}")
    parsed, positions = [], []
    for d, (_, text) in enumerate(docs):
        lines, cands, pool = doc_examples(text, min_chars, max_chars, min_letters, context_lines,
                                          context_chars, min_context)
        parsed.append((lines, pool))
        positions += [(d, start, i) for start, i in cands]
    rng.shuffle(positions)
    out = []
    for d, start, i in positions:
        if len(out) == n:
            break
        lines, pool = parsed[d]
        answer = lines[i].rstrip()
        context = "\n".join(line.rstrip() for line in lines[start:i])
        if len(context) > context_chars:  # one very long line: keep its end
            context = context[-context_chars:]
        banned = {line.strip() for line in lines[start:i + 1]}
        others = [s for s in pool if s not in banned]
        if len(others) < 3:
            continue
        ind = indent_of(answer)
        choices = [answer] + [ind + s for s in rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        out.append({"context": context, "choices": [choices[j] for j in order], "label": order.index(0),
                    "source": docs[d][0], "line": i + 1})
    if len(out) < n:
        raise SystemExit(f"error: {domain}: only {len(out)} usable positions in {len(docs)} held-out documents "
                         f"(asked for {n}); lower -n")
    return out


def read_jsonl(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def check_heldout(data: Path, domain: str, texts: list[str], tokenizer: Path | None) -> list[str]:
    """Check the raw held-out texts against what the runs hold out and train on; the lines
    saying what was checked."""
    said = []
    train = data / "raw" / f"{domain}_train.jsonl"
    if train.is_file():
        digest = lambda t: hashlib.sha256(t.encode("utf-8")).digest()  # noqa: E731
        train_texts = read_jsonl(train)
        train_docs = {digest(t) for t in train_texts}
        both = sum(digest(t) in train_docs for t in texts)
        if both:
            raise SystemExit(f"error: {domain}: {both} held-out document(s) are also training documents ({train})")
        said.append(f"none of its documents is one of the {len(train_texts)} of {train.name}")
    prefix = data / f"{domain}_heldout"
    if tokenizer is not None and tokenizer.is_file() and prefix.with_suffix(".idx").is_file():
        sys.path.insert(0, str(ROOT))
        from sat_dist.data.indexed import IndexedDatasetReader
        from sat_dist.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        ds = IndexedDatasetReader(prefix)
        if len(ds) != len(texts):
            raise SystemExit(f"error: {domain}: {len(texts)} raw held-out documents, {len(ds)} in {prefix}.idx")
        for d, t in enumerate(texts):
            ids, stored = tok.encode(t), ds[d].tolist()
            if stored[:len(ids)] != ids or len(stored) - len(ids) not in (0, 1):
                raise SystemExit(f"error: {domain}: raw held-out document {d} is not document {d} of {prefix}")
        said.append(f"every document equals its tokens in {prefix.name}.bin")
    summary = data.parent / "setup_summary.json"
    if summary.is_file():
        held = json.loads(summary.read_text())["data"][domain]["heldout"]
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        if (held["documents"], held["bytes"]) != (len(texts), nbytes):
            raise SystemExit(f"error: {domain}: raw held-out has {len(texts)} documents, {nbytes} bytes; "
                             f"{summary} says {held['documents']}, {held['bytes']}")
        said.append(f"counts as in {summary.name}")
    return said


def names_of(data: Path, domain: str, count: int) -> list[str]:
    summary = data.parent / "setup_summary.json"
    names = []
    if summary.is_file():
        names = json.loads(summary.read_text())["data"][domain]["heldout"].get("names", [])
    return [names[d] if d < len(names) else f"{domain}_heldout[{d}]" for d in range(count)]


def write_task(out: Path, domain: str, examples: list[dict], argv: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"nextline_{domain}.jsonl", "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    (out / f"nextline_{domain}.yaml").write_text(YAML.format(domain=domain, describe=DESCRIBE.get(domain, domain),
                                                            n=len(examples), argv=argv))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default="runs/cpt_setup/data", help="the set-up's data folder (default %(default)s)")
    p.add_argument("--out", default="runs/cpt_setup/tasks", help="output folder (default %(default)s)")
    p.add_argument("-n", "--examples", type=int, default=40,
                   help="examples per domain (default %(default)s: both tasks in ~4-5 minutes of a loaded 2-core CPU)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokenizer", default="runs/cpt_setup/smollm2-135m/tokenizer.json",
                   help="the data's tokenizer, to check the raw texts against the indexed held-out sets")
    p.add_argument("--context-lines", type=int, default=12, help="non-empty lines of context at most")
    p.add_argument("--context-chars", type=int, default=520, help="characters of context at most")
    p.add_argument("--min-chars", type=int, default=12, help="a non-trivial line's length at least (stripped)")
    p.add_argument("--max-chars", type=int, default=160, help="a choice's length at most (stripped)")
    p.add_argument("--min-letters", type=int, default=4, help="a non-trivial line's letters at least")
    a = p.parse_args(argv)
    if a.examples < 1:
        p.error("-n: allowed: an integer >= 1")
    data, out = Path(a.data), Path(a.out)
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    for domain in DOMAINS:
        raw = data / "raw" / f"{domain}_heldout.jsonl"
        if not raw.is_file():
            p.error(f"{raw} not found: run tools/setup_cpt_experiment.py first")
        texts = read_jsonl(raw)
        said = check_heldout(data, domain, texts, Path(a.tokenizer) if a.tokenizer else None)
        docs = list(zip(names_of(data, domain, len(texts)), texts))
        ex = build(docs, a.examples, a.seed, domain, min_chars=a.min_chars, max_chars=a.max_chars,
                   min_letters=a.min_letters, context_lines=a.context_lines, context_chars=a.context_chars)
        write_task(out, domain, ex, shown)
        ctx = sum(len(e["context"]) for e in ex) / len(ex)
        print(f"{domain}: {len(ex)} examples from {len({e['source'] for e in ex})} of {len(texts)} held-out "
              f"documents (mean context {ctx:.0f} chars) -> {out / f'nextline_{domain}.jsonl'}; checked: "
              + ("; ".join(said) or "nothing (no training file, index or summary beside the data)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tools/make_nextline_task.py on a tiny synthetic held-out set: the answer is the true next
line, the distractors are other lines of the same document, the output is deterministic and
loads as the harness loads tests/eval_tasks."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_nextline_task", REPO / "tools" / "make_nextline_task.py")
mnt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mnt)


def _doc(tag: str, n: int) -> str:
    """Lines of a document: non-trivial ones (some indented, one repeated), short ones, blanks."""
    out = []
    for k in range(n):
        ind = "    " * (k % 3)
        out.append(f"{ind}{tag} line number {k} says something")
        if k % 4 == 1:
            out.append(f"{ind}x = {k}")  # trivial: never an answer or a distractor
        if k % 5 == 2:
            out.append("")
        if k % 7 == 3:
            out.append(f"{tag} repeated line of the document")
    return "\n".join(out) + "\n"


def _data(root: Path, docs: dict[str, list[str]], train: dict[str, list[str]] = None) -> Path:
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    for domain, texts in docs.items():
        (raw / f"{domain}_heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for domain, texts in (train or {}).items():
        (raw / f"{domain}_train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root / "data"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answer_is_the_next_line_and_distractors_come_from_its_document():
    texts = [_doc("alpha", 30), _doc("beta", 25), _doc("gamma", 40)]
    docs = [(f"doc{d}", t) for d, t in enumerate(texts)]
    ex = mnt.build(docs, 40, 7, "new", context_lines=5, context_chars=150)
    assert len(ex) == 40 and len({(e["source"], e["line"]) for e in ex}) == 40
    assert len({e["source"] for e in ex}) == 3
    for e in ex:
        lines = texts[int(e["source"][3:])].split("\n")
        i = e["line"] - 1
        answer = e["choices"][e["label"]]
        assert answer == lines[i] and len(answer.strip()) >= 12
        # the context is the document just before the answer, capped
        assert ("\n".join(lines[:i])).endswith(e["context"]) and e["context"].strip()
        assert len(e["context"]) <= 150 and sum(bool(s.strip()) for s in e["context"].split("\n")) <= 5
        ind = answer[:len(answer) - len(answer.lstrip())]
        stripped = [c.strip() for c in e["choices"]]
        assert len(e["choices"]) == 4 and len(set(stripped)) == 4
        doc_lines = {s.strip() for s in lines}
        for c in e["choices"]:
            assert c.startswith(ind) and c.strip() in doc_lines and len(c.strip()) >= 12  # same document
            if c != answer:
                assert c.strip() != answer.strip()
                assert c.strip() not in {s.strip() for s in e["context"].split("\n")}
    assert len({e["label"] for e in ex}) > 1


def test_deterministic_checked_and_loads_as_a_harness_task(tmp_path, capsys):
    docs = {"new": [_doc("alpha", 30), _doc("beta", 25)], "old": [_doc("gamma", 40)]}
    data = _data(tmp_path, docs, train={"new": [_doc("delta", 10)], "old": [_doc("eps", 10)]})
    outs = []
    for k, seed in ((0, 5), (0, 5), (2, 6)):  # the same arguments twice, then another seed
        out = tmp_path / f"tasks{k}"
        assert mnt.main(["--data", str(data), "--out", str(out), "-n", "12", "--seed", str(seed),
                         "--tokenizer", ""]) == 0
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert sorted(outs[0]) == ["nextline_new.jsonl", "nextline_new.yaml", "nextline_old.jsonl", "nextline_old.yaml"]
    assert outs[0] == outs[1]
    assert outs[0]["nextline_new.jsonl"] != outs[2]["nextline_new.jsonl"]
    assert "checked: none of its documents is one of the 1 of new_train.jsonl" in capsys.readouterr().out
    # a held-out document that is also a training document is refused
    bad = _data(tmp_path / "bad", docs, train={"new": [docs["new"][1]]})
    with pytest.raises(SystemExit, match="also training documents"):
        mnt.main(["--data", str(bad), "--out", str(tmp_path / "x"), "-n", "4", "--tokenizer", ""])

    pytest.importorskip("lm_eval")
    from sat_dist.eval.tasks import load_eval_tasks

    tasks = load_eval_tasks(["nextline_new", "nextline_old"], str(tmp_path / "tasks0"), None).loaded["tasks"]
    for domain in ("new", "old"):
        task = tasks[f"nextline_{domain}"]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        exs = _read(tmp_path / "tasks0" / f"nextline_{domain}.jsonl")
        assert len(task.instances) == 4 * len(exs) == 48
        for inst in task.instances:
            e = exs[inst.doc_id]
            assert inst.arguments == (e["context"], "\n" + e["choices"][inst.idx])
        assert [task.doc_to_target(d) for d in task.eval_docs] == [e["label"] for e in exs]

"""Document boundaries inside packed samples (--reset-position-ids, --reset-attention-mask,
--eod-mask-loss, Megatron's semantics).

References: hand-written positions / documents / masks; transformers' LlamaForCausalLM run
on each document ALONE (unpacked); the single-process model for TP and recompute.
"""

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from sat_dist.checkpoint.hf import merge_tp_state_dicts, shard_hf_state_dict
from sat_dist.config import ModelConfig, SATConfig, TrainConfig
from sat_dist.data.documents import DocumentInputs, document_inputs
from sat_dist.data.indexed import IndexedDatasetWriter, token_dtype
from sat_dist.data.packing import build_packed_datasets
from sat_dist.data.tokenizer import load_tokenizer
from sat_dist.model.llama import LlamaModel, document_attention_mask
from sat_dist.model.sat_state import SATState
from sat_dist.parallel.state import init_distributed
from sat_dist.train.loop import micro_batch_loss
from tests.dist_harness import run_ranks
from tests.launchers import _flags, scalars, torchrun
from tests.reference import hf_config, rank_micro_batches

EOD = 2
CFG = ModelConfig(hidden_size=32, ffn_hidden_size=128, num_layers=2, num_attention_heads=8,
                  num_query_groups=4, vocab_size=200, make_vocab_size_divisible_by=16, name="tiny-gqa")
ALL = {"reset_position_ids": True, "reset_attention_mask": True, "eod_mask_loss": True}


# ---------------------------------------------------------------- the function, by hand
def test_positions_documents_and_mask_by_hand():
    ids = torch.tensor([[5, EOD, 7, 8, EOD, 9, EOD, 3],     # several EODs
                        [EOD, 4, 4, 4, 4, 4, 4, EOD],       # EOD first and last
                        [4, 5, 6, 7, 8, 9, 10, 11]])        # none
    d = document_inputs(ids, EOD, **ALL)
    assert d.position_ids.tolist() == [[0, 1, 0, 1, 2, 0, 1, 0],
                                       [0, 0, 1, 2, 3, 4, 5, 6],
                                       [0, 1, 2, 3, 4, 5, 6, 7]]
    assert d.segment_ids.tolist() == [[0, 0, 1, 1, 1, 2, 2, 3],
                                      [0, 1, 1, 1, 1, 1, 1, 1],
                                      [0, 0, 0, 0, 0, 0, 0, 0]]
    assert d.loss_mask.tolist() == [[1, 0, 1, 1, 0, 1, 0, 1],
                                    [0, 1, 1, 1, 1, 1, 1, 0],
                                    [1, 1, 1, 1, 1, 1, 1, 1]]
    mask = document_attention_mask(d.segment_ids)
    assert mask.shape == (3, 1, 8, 8) and mask.dtype == torch.bool
    row0 = ["10000000",  # query 0 (doc 0) sees 0
            "11000000",  # the EOD at 1 belongs to doc 0
            "00100000",  # 2 starts doc 1: nothing up to and including that EOD
            "00110000",
            "00111000",
            "00000100",
            "00000110",
            "00000001"]  # 7: a document of its own (the EOD at 6 ends doc 2)
    row1 = ["10000000"] + ["0" + "1" * k + "0" * (7 - k) for k in range(1, 8)]
    for b, want in ((0, row0), (1, row1)):
        assert ["".join(str(int(v)) for v in r) for r in mask[b, 0].tolist()] == want
    assert torch.equal(mask[2, 0], torch.ones(8, 8, dtype=torch.bool).tril())
    # each flag alone fills only its own field
    assert document_inputs(ids, EOD) == DocumentInputs()
    only = document_inputs(ids, EOD, reset_attention_mask=True)
    assert only.position_ids is None and only.loss_mask is None and only.segment_ids is not None


def test_masked_mean_by_hand():
    per_token = torch.arange(1.0, 9.0).view(2, 4)
    d = DocumentInputs(loss_mask=torch.tensor([[1.0, 0, 1, 1], [0, 0, 1, 0]]))
    assert float(d.mean_loss(per_token)) == pytest.approx((1 + 3 + 4 + 7) / 4)
    assert float(DocumentInputs().mean_loss(per_token)) == pytest.approx(4.5)
    assert float(DocumentInputs(loss_mask=torch.zeros(2, 4)).mean_loss(per_token)) == 0.0  # not NaN


# ---------------------------------------------------------------- the model
def _hf_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(hf_config(CFG)).float().eval()


def _packed(seed=3):
    """Two packed samples [2, 25] (input 24 + 1): row 0 = documents of 7 and 10 tokens (with
    their EOD) and the first 8 of a third; row 1 = a lone EOD (the end of the previous
    document), documents of 12 and 11 tokens, the last EOD at the last input position."""
    g = torch.Generator().manual_seed(seed)

    def doc(n, eod=True):
        t = torch.randint(3, CFG.vocab_size, (n,), generator=g)
        if eod:
            t[-1] = EOD
        return t

    rows = [torch.cat([doc(7), doc(10), doc(8, eod=False)]),
            torch.cat([doc(1), doc(12), doc(11), doc(1, eod=False)])]
    tokens = torch.stack(rows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _spans(row: torch.Tensor, eod: int = EOD) -> list[tuple[int, int]]:
    """[start, end) of each document of a row of input ids: a new one after every EOD."""
    cuts = [0] + [i + 1 for i, t in enumerate(row.tolist()) if t == eod and i + 1 < len(row)] + [len(row)]
    return list(zip(cuts[:-1], cuts[1:]))


def _alone(forward, ids: torch.Tensor, eod: int = EOD, vocab: int = CFG.vocab_size) -> torch.Tensor:
    """Logits [b, s, vocab] with every document run by itself through `forward` (ids [1, n])."""
    return torch.stack([torch.cat([forward(ids[b:b + 1, a:e])[0, :, :vocab] for a, e in _spans(ids[b], eod)])
                        for b in range(ids.shape[0])])


def _ours(hf, sat=None, recompute=False):
    model = LlamaModel(CFG, sat, recompute=recompute)
    model.load_state_dict(shard_hf_state_dict(hf.state_dict(), CFG, 1, 0))
    return model


@torch.no_grad()
def test_packed_logits_equal_each_document_alone():
    hf = _hf_model()
    ids, _ = _packed()
    assert len(_spans(ids[0])) == 3 and len(_spans(ids[1])) == 3
    ref = _alone(lambda x: hf(x).logits, ids)
    model = _ours(hf)
    doc = document_inputs(ids, EOD, **ALL)
    ours = model(ids, **doc.model_inputs())[..., :CFG.vocab_size]
    err = float((ours - ref).abs().max())
    assert err < 1e-4, err
    # The test can fail: without the flags the first document still matches (causal), the
    # later ones see the earlier documents and sit at shifted positions.
    plain = model(ids)[..., :CFG.vocab_size]
    (a0, e0), (a1, e1) = _spans(ids[0])[:2]
    assert float((plain[0, a0:e0] - ref[0, a0:e0]).abs().max()) < 1e-4
    assert float((plain[0, a1:e1] - ref[0, a1:e1]).abs().max()) > 1e-2
    # The dense path (no documents given) is the old one: bit-identical to passing None.
    assert torch.equal(plain, model(ids, position_ids=None, segment_ids=None)[..., :CFG.vocab_size])
    # RoPE sees only relative positions: once attention stays inside a document, restarting
    # its positions changes nothing (up to rounding). The next test covers the positions.
    masked = model(ids, **document_inputs(ids, EOD, reset_attention_mask=True).model_inputs())
    assert float((masked[..., :CFG.vocab_size] - ours).abs().max()) < 1e-5


@torch.no_grad()
def test_reset_positions_alone_equal_transformers_with_those_positions():
    """--reset-position-ids without the mask (Megatron allows it): attention still crosses
    documents, the rotary positions restart; transformers takes the same position_ids."""
    hf = _hf_model()
    ids, _ = _packed()
    doc = document_inputs(ids, EOD, reset_position_ids=True)
    assert doc.position_ids[0].tolist() == list(range(7)) + list(range(10)) + list(range(7))
    ref = hf(ids, position_ids=doc.position_ids).logits
    model = _ours(hf)
    ours = model(ids, **doc.model_inputs())[..., :CFG.vocab_size]
    assert float((ours - ref).abs().max()) < 1e-5
    assert float((model(ids)[..., :CFG.vocab_size] - ref).abs().max()) > 1e-4  # positions did matter


@torch.no_grad()
def test_packed_logits_with_sat_omission_equal_each_document_alone():
    """SAT omits units inside the masked attention: with the same units forced, a packed
    sample gives each document's logits of the same SAT model run alone."""
    hf = _hf_model()
    ids, _ = _packed(seed=4)
    sat = SATState(SATConfig(align_mlp=8, token_stride=1).validate())
    g = torch.Generator().manual_seed(7)
    for layer in range(CFG.num_layers):
        sat.forced[(layer, "mlp")] = torch.randperm(CFG.ffn_hidden_size, generator=g)[:48].sort().values
        sat.forced[(layer, "attn")] = torch.tensor([layer % 4, (layer + 2) % 4]).sort().values
    sat.set_step(5, 0, attn=0.5, mlp=0.6)
    model = _ours(hf, sat)
    ref = _alone(model, ids)
    ours = model(ids, **document_inputs(ids, EOD, **ALL).model_inputs())[..., :CFG.vocab_size]
    assert float((ours - ref).abs().max()) < 1e-5
    assert float((ours - _alone(lambda x: hf(x).logits, ids)).abs().max()) > 1e-2  # units were omitted


def _masked_reference_loss(hf_forward, ids, labels, eod: int = EOD, vocab: int = CFG.vocab_size) -> float:
    """Mean, over positions whose input is not EOD, of the cross entropy of each document's
    own logits (run alone) against the labels."""
    logits = _alone(hf_forward, ids, eod, vocab)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            if int(ids[b, i]) != eod:
                total += float(F.cross_entropy(logits[b, i], labels[b, i]))
                count += 1
    return total / count


def test_micro_batch_loss_is_the_masked_mean_of_each_document_alone():
    """The loop's micro-batch loss with the three flags (through a stand-in engine)."""
    hf = _hf_model()
    ids, labels = _packed()
    model = _ours(hf)
    run = SimpleNamespace(train=SimpleNamespace(**ALL))
    source = SimpleNamespace(eos_id=EOD)
    loss = micro_batch_loss(model, ids, labels, run, source, torch.device("cpu"))
    with torch.no_grad():
        want = _masked_reference_loss(lambda x: hf(x).logits, ids, labels)
    assert float(loss.detach()) == pytest.approx(want, abs=1e-5)
    # eod_mask_loss alone: the plain forward, masked mean of its own per-token loss
    run = SimpleNamespace(train=SimpleNamespace(reset_position_ids=False, reset_attention_mask=False,
                                                eod_mask_loss=True))
    per_token = model(ids, labels).detach()
    keep = ids != EOD
    assert float(micro_batch_loss(model, ids, labels, run, source, torch.device("cpu")).detach()) == pytest.approx(
        float(per_token[keep].sum() / keep.sum()), abs=1e-6)
    assert int(keep.sum()) == ids.numel() - 5  # the 5 EOD inputs of _packed()


# ---------------------------------------------------------------- TP and recompute
def _loss_grads_logits(model, ids, labels):
    doc = document_inputs(ids, EOD, **ALL)
    loss = doc.mean_loss(model(ids, labels, **doc.model_inputs()))
    loss.backward()
    with torch.no_grad():
        logits = model(ids, **doc.model_inputs())
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, logits


def _tp_worker(rank, world, hf_sd, ids, labels):
    comm = init_distributed(world)
    model = LlamaModel(CFG, SATState(None, comm), comm, recompute=True)
    model.load_state_dict(shard_hf_state_dict(hf_sd, CFG, world, comm.tp_rank))
    return comm.tp_rank, *_loss_grads_logits(model, ids, labels)


def test_tp2_and_recompute_equal_tp1():
    hf = _hf_model()
    ids, labels = _packed()
    loss1, grads1, logits1 = _loss_grads_logits(_ours(hf), ids, labels)
    loss_rc, grads_rc, logits_rc = _loss_grads_logits(_ours(hf, recompute=True), ids, labels)
    assert loss_rc == loss1 and torch.equal(logits_rc, logits1)
    assert all(torch.equal(grads_rc[n], grads1[n]) for n in grads1)

    res = sorted(run_ranks(2, _tp_worker, hf.state_dict(), ids, labels), key=lambda r: r[0])
    ref = merge_tp_state_dicts([grads1], CFG)
    tp2 = merge_tp_state_dicts([r[2] for r in res], CFG)
    grad_err = max(float((tp2[k] - ref[k]).abs().max()) for k in ref)
    logits2 = torch.cat([r[3] for r in res], dim=-1)
    for r in res:
        assert r[1] == pytest.approx(loss1, abs=1e-6)
    assert grad_err < 1e-5, grad_err
    assert float((logits2[..., :CFG.vocab_size] - logits1[..., :CFG.vocab_size]).abs().max()) < 1e-5


# ---------------------------------------------------------------- a real run
SEQ = 64


@pytest.fixture(scope="module")
def short_docs(corpus, tmp_path_factory):
    """A dataset of short documents (3 to 30 tokens, each ending with EOS), so that every
    64-token sample holds several boundaries: 40 samples."""
    tok = load_tokenizer(corpus["tok"])
    d = tmp_path_factory.mktemp("short_docs")
    rng = random.Random(0)
    words = tok.encode(Path(__file__).read_text())
    total = 0
    with IndexedDatasetWriter(d / "docs", token_dtype(tok.vocab_size)) as w:
        while total < 40 * SEQ + 1:
            n = rng.randint(2, 29)
            start = rng.randrange(len(words) - n)
            doc = words[start:start + n] + [tok.eos_id]
            w.add_document(doc)
            total += len(doc)
        w.finalize()
    return str(d / "docs"), tok.eos_id


@torch.no_grad()
def _hf_run_loss(hf, micro_batches, eos) -> float:
    """Mean over micro-batches of the masked per-document loss, as the run computes it."""
    losses = [_masked_reference_loss(lambda x: hf(x).logits, ids, labels, eos, hf.config.vocab_size)
              for ids, labels in micro_batches]
    return sum(losses) / len(losses)


def test_run_with_the_three_flags(corpus, hf_init, short_docs, tmp_path):
    """TP=1 x DP=2 ZeRO-3, --lr 0 from transformers' weights, dense schedule: every logged
    training loss and the validation loss equal transformers' masked loss of each document
    run alone, on the very samples each step used."""
    prefix, eos = short_docs
    flags = _flags(corpus, **{"data-path": prefix, "hf-checkpoint": hf_init, "model-config": None,
                              "lr": 0, "min-lr": 0, "lr-warmup-iters": 0, "train-iters": 2,
                              "sat-schedule": "dense", "tensorboard-dir": tmp_path / "tb",
                              "reset-position-ids": True, "reset-attention-mask": True,
                              "eod-mask-loss": True})
    r = torchrun(2, flags)
    assert "iteration        2/       2" in r.stdout and "validation at iteration 2" in r.stdout

    hf = LlamaForCausalLM.from_pretrained(hf_init).float().eval()
    sets = build_packed_datasets(prefix, SEQ, eos, TrainConfig().seed, "90,10,0")
    lm = scalars(tmp_path / "tb", "lm loss")
    for step in (1, 2):  # global batch 8, micro-batch 2, DP 2
        batches = [mb for rank in (0, 1) for mb in rank_micro_batches(sets["train"], (step - 1) * 8, 8, 2, rank, 2)]
        assert all(int((ids == eos).sum()) >= 2 for ids, _ in batches)  # boundaries in every micro-batch
        assert lm[step] == pytest.approx(_hf_run_loss(hf, batches, eos), abs=2e-5), step
    batches = [mb for rank in (0, 1) for mb in rank_micro_batches(sets["valid"], 0, 8, 2, rank, 2)]
    assert scalars(tmp_path / "tb", "lm loss validation")[2] == pytest.approx(
        _hf_run_loss(hf, batches, eos), abs=2e-5)

"""Which runs are the embedded default job (runs/default/ for data, TensorBoard and
checkpoints) and which flags are refused without data of one's own, decided by the run
plan before any process group or file exists."""

import pytest

from sat_dist.errors import SatDistError
from sat_dist.train.main import DEFAULT_RUN, plan_run


def test_no_flags_is_the_default_job():
    plan = plan_run([])
    t = plan.run.train
    assert plan.default_job and plan.embedded_data
    assert t.save == str(DEFAULT_RUN / "checkpoints") and t.tensorboard_dir == str(DEFAULT_RUN / "tensorboard")


def test_a_model_config_without_data_keeps_out_of_the_default_jobs_directories(tmp_path):
    """Before: --model-config X with no --data-path became the default job and tried to
    resume runs/default/checkpoints with another model."""
    import json

    from sat_dist.train.arguments import MODEL_CONFIG_DIR

    cfg = json.loads((MODEL_CONFIG_DIR / "tiny-test.json").read_text())
    own = tmp_path / "mine.json"
    own.write_text(json.dumps(dict(cfg, name="mine", vocab_size=8000)))  # fits the embedded tokenizer
    plan = plan_run(["--model-config", str(own)])
    t = plan.run.train
    assert plan.embedded_data and not plan.default_job
    assert t.save is None and t.load is None and t.tensorboard_dir is None
    plan = plan_run(["--model-config", str(own), "--save", str(tmp_path / "ck")])
    assert plan.run.train.save == str(tmp_path / "ck") and plan.run.train.load is None
    # a model whose vocabulary the embedded tokenizer overflows: refused before any corpus work
    with pytest.raises(SatDistError, match="smaller than the embedded corpus' tokenizer"):
        plan_run(["--model-config", "tiny-test"])


@pytest.mark.parametrize("flags,msg", [
    (["--tokenizer-model", "README.md"],
     "--tokenizer-model README.md is the tokenizer of --data-path, which is not given"),
    (["--hf-checkpoint", "/nonexistent/hf"], "--hf-checkpoint /nonexistent/hf needs data tokenized with its tokenizer"),
    (["--test-data-path", "/d/x"], "--test-data-path needs --tokenizer-model"),
])
def test_flags_that_need_data_are_refused_not_ignored(flags, msg):
    with pytest.raises(SatDistError) as e:
        plan_run(flags)
    assert msg in str(e.value)

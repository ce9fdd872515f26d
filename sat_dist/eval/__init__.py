"""Downstream evaluation during training through lm-evaluation-harness (--eval-tasks):
tasks.py finds and loads the tasks at start-up, harness_adapter.py is the harness's LM
interface over the model being trained, runner.py runs it and writes the results
(docs/EVALUATION.md). Nothing here imports lm_eval at import time of sat_dist.eval itself."""

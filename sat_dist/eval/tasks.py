"""--eval-tasks: the downstream tasks of lm-evaluation-harness, found, loaded and checked at
start-up (in every process, before any process group exists), so that a task the harness
does not know, or whose data is not on this machine, is one `error:` line before training.

The run never downloads: unless HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set, both are set to
1 here, and the harness reads each task's data from the datasets cache or from local files
(a YAML task of one's own in --eval-tasks-path: `dataset_path: json` with `data_files`).
lm_eval is imported only here and in sat_dist.eval.harness_adapter, i.e. only when
--eval-tasks is given.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sat_dist.errors import SatDistError

FEWSHOT_SEED = 1234
"""The few-shot sampler's seed (lm-eval's own default): the same prompts on every rank and in
every evaluation."""


def require_package(module: str, flag: str, extra: str) -> None:
    """One line naming the pip extra when an optional package is missing (nothing imported)."""
    if importlib.util.find_spec(module) is None:
        raise SatDistError(f"{flag} needs the {module} package, which is not installed: pip install "
                           f"'sat_dist[{extra}]' (in a checkout: pip install -e '.[{extra}]')")


def task_names(values: Optional[list[str]]) -> list[str]:
    """--eval-tasks values ("a,b c") -> ["a", "b", "c"], in order, each once."""
    out: list[str] = []
    for v in values or []:
        for name in v.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return out


def use_offline_hub() -> None:
    """Make the datasets library read its cache and local files only, unless the environment
    says otherwise (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE set, e.g. to 0); also in the
    libraries imported before this, which read the environment at import."""
    if "HF_DATASETS_OFFLINE" not in os.environ and "HF_HUB_OFFLINE" not in os.environ:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    if not any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub

        hub.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as dsc

        dsc.HF_HUB_OFFLINE = dsc.HF_DATASETS_OFFLINE = True


@dataclass
class EvalTasks:
    """The loaded tasks: lm-eval's task dict ({"tasks", "groups", "group_map"}), reused by
    every evaluation of the run (the data is read once, at start-up)."""

    names: list[str]
    loaded: dict
    limit: Optional[int]
    harness_version: str


def load_eval_tasks(values: list[str], path: Optional[str], limit: Optional[int]) -> EvalTasks:
    """Find and load --eval-tasks (raises SatDistError naming the task and what to do)."""
    require_package("lm_eval", "--eval-tasks", "eval")
    names = task_names(values)
    if not names:
        raise SatDistError("--eval-tasks: no task named; give names such as hellaswag,arc_easy")
    if path is not None and not Path(path).is_dir():
        raise SatDistError(f"--eval-tasks-path {path}: no such directory (it holds task YAML files of one's own)")
    use_offline_hub()
    import logging

    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # a bar per task and rank at start-up otherwise
    version = getattr(lm_eval, "__version__", "?")
    tm = None
    if path is not None:
        # Tasks of one's own only: indexing just that directory takes milliseconds, the
        # harness's ~15k YAMLs several seconds per process.
        own = _task_manager(str(Path(path).resolve()), False)
        if all(n in own.task_index for n in names):
            tm = own
    if tm is None:
        tm = _task_manager(str(Path(path).resolve()) if path else None, True)
    for n in names:
        if n not in tm.task_index:
            close = difflib.get_close_matches(n, tm.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" or in --eval-tasks-path {path}" if path else ""
            raise SatDistError(f"--eval-tasks {n}: not a task, group or tag of lm-evaluation-harness {version}"
                               f"{where}{hint} (`lm-eval ls tasks` lists them; a task of one's own is a YAML file "
                               f"in a directory given with --eval-tasks-path)")
    loaded: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
    for n in names:
        try:
            one = tm.load([_spec(tm, n, path)])
        except SatDistError:
            raise
        except Exception as e:  # datasets and the harness raise many types; each becomes one line
            raise SatDistError(_load_error(tm, n, e)) from None
        for key in loaded:
            loaded[key].update(one.get(key) or {})
    generating = sorted(name for name, task in loaded["tasks"].items()
                        if getattr(task, "OUTPUT_TYPE", None) == "generate_until")
    if generating:
        raise SatDistError(f"--eval-tasks: {', '.join(generating)} generate text (output_type generate_until), "
                           f"which the in-run evaluation does not do: it scores log-likelihoods (multiple_choice, "
                           f"loglikelihood and loglikelihood_rolling tasks). Evaluate those on an exported "
                           f"checkpoint: tools/export_hf.py, then lm-eval --model hf")
    for task in loaded["tasks"].values():
        # lm-eval's simple_evaluate does the same: a task without a default runs zero-shot
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return EvalTasks(names, loaded, limit, version)


@functools.lru_cache(maxsize=4)
def _task_manager(path: Optional[str], defaults: bool):
    """The harness's task index (built once per process and directory)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=path, include_defaults=defaults)


def _spec(tm, name: str, path: Optional[str]):
    """What to ask the TaskManager for: the name, or, for a task of one's own whose YAML has
    data_files relative to its own directory, its config with those paths made absolute
    (the harness would read them relative to the working directory)."""
    if path is None:
        return name
    entry = tm.task_index[name]
    yaml_path = getattr(entry, "yaml_path", None)
    root = Path(path).resolve()
    if yaml_path is None or getattr(entry, "cfg", None) is None or "task" not in entry.cfg:
        return name
    yaml_path = Path(yaml_path).resolve()
    if root not in yaml_path.parents:
        return name
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # another harness layout: its own (working-directory) rule applies
        return name
    cfg = load_yaml(yaml_path, resolve_func=True)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return name

    def resolve(f):
        if isinstance(f, str) and "://" not in f and not Path(f).is_absolute():
            beside = yaml_path.parent / f
            if beside.exists():
                return str(beside)
        return f

    if isinstance(files, dict):
        fixed = {k: ([resolve(x) for x in v] if isinstance(v, list) else resolve(v)) for k, v in files.items()}
    elif isinstance(files, list):
        fixed = [resolve(x) for x in files]
    else:
        fixed = resolve(files)
    if fixed == files:
        return name
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": fixed}
    return cfg


def _load_error(tm, name: str, e: Exception) -> str:
    """One line for a task that could not be loaded: what data it wanted and how to provide it."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    entry = tm.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    data = cfg.get("dataset_path")
    if cfg.get("dataset_name"):
        data = f"{data}, {cfg['dataset_name']}"
    offline = "offline" in f"{type(e).__name__} {first}".lower() or isinstance(e, ConnectionError)
    if isinstance(e, FileNotFoundError) and not offline:
        return (f"--eval-tasks {name}: its data file is missing ({first}); put the file where the task's YAML "
                f"says (data_files relative to the YAML's directory, or absolute)")
    if offline or isinstance(e, FileNotFoundError) or "couldn't" in first.lower():
        fetch = (f"python -c \"import datasets; datasets.load_dataset('{cfg.get('dataset_path')}'"
                 + (f", '{cfg['dataset_name']}'" if cfg.get("dataset_name") else "") + ")\"")
        return (f"--eval-tasks {name}: its data ({data or 'see its YAML'}) is not in the datasets cache of this "
                f"machine, and the run does not download ({type(e).__name__}: {first}); fetch it once where there "
                f"is network, into the cache the run reads (HF_DATASETS_CACHE): {fetch}, or give a local copy as "
                f"a task of one's own in --eval-tasks-path (dataset_path: json, dataset_kwargs.data_files)")
    return f"--eval-tasks {name}: the harness could not load it ({type(e).__name__}: {first})"

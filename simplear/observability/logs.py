"""A console a person can read: the stages' own lines (start, progress every `progress_interval_s`, end with its
figures) at INFO, other libraries' per-event lines only with `--verbose`.

Every process of a run (the driver, a stage's task, a training worker) calls `quiet_libraries()` after its
logging is set up, because Ray workers configure logging themselves; `--verbose` reaches them as SIMPLEAR_VERBOSE
in the environment (embedded Ray) or the job's runtime env (attached)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

VERBOSE_ENV = "SIMPLEAR_VERBOSE"


def _module_file(module: str) -> str:
    """Ray Train names some loggers after their source file (`logging.getLogger(__file__)`), not their module."""
    spec = importlib.util.find_spec(module)
    return spec.origin if spec and spec.origin else module


def chatty_loggers() -> list[str]:
    """Loggers whose INFO lines come one per event, not per stage: Ray Train's worker logs every report as a
    multi-line `Reporting training result N: TrainingReport(...)`. (Ray Train's own `ray.train` logger is set by
    the controller's dictConfig: `train_log_level()` goes to its RunConfig instead.)"""
    return [_module_file("ray.train.v2._internal.execution.context")]


# What libraries read from the environment, each in its own process, to keep their per-event output off a console
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub and transformers: `Loading weights`, `Writing model shards`
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM's engine start-up and per-interval throughput lines
}


def quiet_env() -> dict[str, str]:
    """The switches for a run's processes (none when verbose), keeping a value the user set; set in this process
    too, so that an embedded Ray's workers inherit them."""
    if is_verbose():
        return {}
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in QUIET_ENV}


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_ENV] = "1"


def quiet_libraries() -> None:
    if is_verbose():
        return
    for name in chatty_loggers():
        logging.getLogger(name).setLevel(logging.WARNING)
    # trl checks the installed vLLM against the range it generates with on every import; GRPO here draws its
    # rollouts with the project's sampler, never trl's vLLM path, so the check says nothing about this run
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions", category=UserWarning)
    if "ray.data" in sys.modules:
        # Ray Data's own console handler (its `ray.data` logger does not propagate); its session log file,
        # ray-data.log, keeps every line
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)


def ray_data_progress(interactive: bool) -> None:
    """Ray Data's progress bars in a terminal (drawn by the driver's console); elsewhere its progress goes to
    ray-data.log as lines, and the stage's own progress line is what the console shows. (Turning the bars off
    instead makes Ray Data warn about it once per process.)"""
    import ray.data

    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = True
    data_ctx.use_ray_tqdm = interactive  # else, outside a terminal: logged progress
    data_ctx.print_on_execution_start = False


def train_log_level() -> str:
    """For ray.train.LoggingConfig: the controller's state transitions and worker-group lines only when verbose."""
    return "INFO" if is_verbose() else "WARNING"

"""The one way this project runs vLLM in a child process: ``run_child`` -> ``child_main``.

vLLM pins threads, keeps global state and can hang in interpreter teardown, so every tool
(``qvlm bench``, ``qvlm compare``, ``qvlm demo``) and the tests' vLLM runner give each engine a
process of its own. The parent writes the job as JSON, the child (a module run with
``-m MODULE _child TASK JOB OUT`` or a script path) runs ``tasks[TASK](job)`` and writes the
JSON result; the child's output goes to a log file whose tail is in the error when it fails.
The child's environment (:func:`child_env`) is offline with the in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: a small model loads in seconds, not a minute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def child_env(threads: int | None, device: str = "cpu", extra: dict | None = None) -> dict:
    """A child's environment: offline, in-process vLLM engine; on CPU also its KV-cache space and
    (when given) its threads. On CUDA no ``OMP_NUM_THREADS``/``VLLM_CPU_*``: vLLM and torch pick."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
    env.pop("TRITON_INTERPRET", None)  # set by the test suite for Triton on CPU; not wanted here
    env.update(extra or {})
    return env


def run_child(task: str, job, workdir: Path, name: str, *, module: str | None = None, script: str | None = None,
              threads: int | None = None, timeout: int = 3600, device: str = "cpu", env: dict | None = None):
    """Run ``task`` on ``job`` in a fresh interpreter (``module`` with ``-m``, or ``script``);
    returns its JSON result. Logs and job files go to ``workdir/logs/NAME.*``."""
    if (module is None) == (script is None):
        raise ValueError("run_child needs exactly one of module= or script=")
    logs = Path(workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    job_file, out_file, log_file = logs / f"{name}.job.json", logs / f"{name}.result.json", logs / f"{name}.log"
    job_file.write_text(json.dumps(job))
    out_file.unlink(missing_ok=True)
    entry = ["-m", module] if module else [str(script)]
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, *entry, "_child", task, str(job_file), str(out_file)],
                              env=child_env(threads, device, env), stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0 or not out_file.exists():
        tail = log_file.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"child {name!r} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    result = json.loads(out_file.read_text())
    if isinstance(result, dict):
        result["log"] = str(log_file)
    return result


def child_main(argv: list[str], tasks: dict[str, Callable]) -> int:
    """Entry of a child process: ``_child TASK JOB_JSON OUT_JSON`` (``argv`` after the program name)."""
    if argv[:1] == ["_child"]:
        argv = argv[1:]
    task, job_file, out_file = argv
    job = json.loads(Path(job_file).read_text())
    result = tasks[task](job)
    Path(out_file).write_text(json.dumps(result))
    # Skip interpreter teardown: vLLM's in-process engine can hang or crash in atexit handlers
    # after the result is safely on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_measured(args: list[str], env: dict | None = None):
    """Run ``python ARGS...`` (this interpreter) to the end; returns (exit code, its output, its own
    resource usage: ``os.wait4``'s, that child alone — CPU times, peak RSS)."""
    import os

    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out, usage

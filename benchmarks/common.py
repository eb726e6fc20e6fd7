"""Shared helpers: repeat timing, the machine line, a git revision and its solver module for ``--against``, and
appending a table to BENCHMARKS.md."""
from __future__ import annotations

import importlib.util
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, List

ROOT = Path(__file__).resolve().parents[1]
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
TRIM_ENV = "MALLOC_TRIM_THRESHOLD_"
MALLOC_ENV = {MMAP_ENV: str(1 << 30), TRIM_ENV: str(1 << 30)}


def ensure_malloc_env() -> None:
    """Re-exec with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ set high.

    Without the first, glibc maps and zeroes fresh pages for every large
    temporary (each n x n matrix), which made n = 1024 solves ~2.7x slower on
    an AMD EPYC for every solver alike. Setting it alone leaves the trim
    threshold at 128 KiB (an explicit mmap threshold turns off glibc's dynamic
    adjustment of both), so a freed block at the top of the heap goes back to
    the kernel and its pages are zeroed again on the next solve: on an Intel
    Xeon, in a fresh process, 40 float32 iterations at n = 2048 took 57 ms
    against 31 ms with glibc's defaults or with both set (ad hoc, medians of 9).
    With both set, freed blocks stay for reuse, as in a long-running process.
    """
    if any(os.environ.get(name) is None for name in MALLOC_ENV):
        for name, value in MALLOC_ENV.items():
            os.environ.setdefault(name, value)
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        target = ["-m", spec.name] if spec is not None else [sys.argv[0]]
        os.execv(sys.executable, [sys.executable, *target, *sys.argv[1:]])


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_call(fn: Callable[[], object], repeats: int = 3, slow_s: float = 2.0):
    """(the last call's result, the median wall time in seconds of up to ``repeats`` calls); no further
    repeats after a call slower than ``slow_s``."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if times[-1] > slow_s:
            break
    return out, statistics.median_high(times)


def machine() -> str:
    import torch

    from trainables.ot.backend import products_route
    from trainables.pretrain_probe import cpu_model

    return (f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), large CPU products through {products_route()}, "
            f"Python {platform.python_version()}")


def markdown_table(header: List[str], rows: List[List[object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if v != v else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def short_revision(rev: str, prog: str) -> str:
    """git's short id of revision ``rev`` of this checkout (for ``--against``); one line and exit if it is none."""
    out = subprocess.run(["git", "rev-parse", "--short", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{prog}: error: --against {rev}: not a git revision of {ROOT}")
    return out.stdout.strip()


def module_at(rev: str, prog: str):
    """``trainables.ot`` as it is in git revision ``rev`` (a module ``trainables/ot.py`` before the package
    ``trainables/ot/``), loaded as a module of its own (for ``--against``); one line and exit if there is
    neither at ``rev``."""
    tmp = Path(tempfile.mkdtemp())
    show = subprocess.run(["git", "show", f"{rev}:trainables/ot.py"], cwd=ROOT, capture_output=True, text=True)
    if show.returncode == 0:
        path, search = tmp / "ot_at_rev.py", None
        path.write_text(show.stdout)
    else:
        archive = subprocess.run(["git", "archive", rev, "trainables/ot"], cwd=ROOT, capture_output=True)
        if archive.returncode != 0:
            sys.exit(f"{prog}: error: --against {rev}: {archive.stderr.decode().strip()}")
        tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(tmp, filter="data")
        path, search = tmp / "trainables" / "ot" / "__init__.py", [str(tmp / "trainables" / "ot")]
    spec = importlib.util.spec_from_file_location("ot_at_rev", path, submodule_search_locations=search)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def record(title: str, body: str) -> None:
    """Print the section and write it, with the command that produced it, into BENCHMARKS.md: in place of
    the section an earlier run of the same command wrote (history lives in git), else at the end."""
    cmd = "".join(f"{name}={os.environ[name]} " for name in MALLOC_ENV if os.environ.get(name))
    run = "-m benchmarks." + Path(sys.argv[0]).stem + " " + " ".join(sys.argv[1:])
    cmd += ".venv/bin/python " + run
    text = (f"\n## {title}\n\nCommand: `{cmd.strip()}`  \nMachine: {machine()}  \n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{body}\n")
    print(text)
    path = ROOT / "BENCHMARKS.md"
    page = path.read_text() if path.exists() else ""
    path.write_text(replace_section(page, run.strip(), text))


def replace_section(page: str, run: str, text: str) -> str:
    """``page`` with the section whose Command line runs ``run`` (env settings aside) replaced by ``text``,
    or with ``text`` appended where there is none."""
    starts = [m.start() for m in re.finditer(r"(?m)^## ", page)] + [len(page)]
    for begin, end in zip(starts, starts[1:]):
        head = re.search(r"(?m)^Command: `(.*)`", page[begin:end])
        if head and head.group(1).split(".venv/bin/python ", 1)[-1].strip() == run:
            return page[:begin].rstrip("\n") + "\n" + text + ("\n" + page[end:] if end < len(page) else "")
    return page.rstrip("\n") + "\n" + text

"""Where and with what a benchmark ran: the machine, versions, git commit, date and command line."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from benchmarks.harness.constants import BENCHMARKS_DIR, REPO_ROOT
from benchmarks.harness.retry import import_mlcontrast


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """``git rev-parse HEAD`` of the checkout, or None (no git, not a repository, ...)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def metadata(device: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    import torch

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv and argv[0].endswith(".py") else None
    if script is not None and script.parent == BENCHMARKS_DIR:
        argv[0:1] = ["-m", f"benchmarks.{script.stem}"]  # run as python -m benchmarks.<module>
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *argv]),
        "cwd": os.getcwd(),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "memory_total_bytes": total_memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version_of("numpy"),
        "mlcontrast": None,
        "git_commit": git_commit(),
    }
    if os.environ.get("MLCONTRAST_TRITON_CONFIGS"):  # tuned Triton launch configurations in force
        meta["triton_configs"] = json.loads(os.environ["MLCONTRAST_TRITON_CONFIGS"])
    try:
        meta["mlcontrast"] = import_mlcontrast(retries=2).__version__
    except Exception as error:  # keep the metadata even when the package does not import
        meta["mlcontrast"] = f"unavailable: {error}"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        meta.update(
            gpu_name=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            hip=getattr(torch.version, "hip", None),
            triton=_version_of("triton"),
            nvidia_driver=nvidia_driver(),
        )
    return meta


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None

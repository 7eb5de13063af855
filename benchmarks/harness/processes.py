"""One case per process: the parent survives whatever happens to the child (exception, allocation failure,
OOM killer, timeout). :func:`run_case_subprocess` (parent side) runs ``python -m <module> --case-json '...'``;
:func:`child_main` (child side) turns each case into one result line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Sequence

from benchmarks.harness.constants import REPO_ROOT
from benchmarks.harness.memory import is_oom
from benchmarks.harness.output import json_default
from benchmarks.harness.retry import retry_count

RESULT_MARKER = "@@MLCONTRAST_BENCH_RESULT@@"


def child_main(run_case: Callable[[dict[str, Any]], dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """Entry point of a child process: ``--case-json '{...}'`` (one case, or a list run one after the other)
    → one line per case, :data:`RESULT_MARKER` followed by its JSON record."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--case-json", required=True)
    args = parser.parse_args(argv)
    cases = json.loads(args.case_json)
    for case in cases if isinstance(cases, list) else [cases]:
        try:
            result = run_case(case)
            result.setdefault("status", "ok")
        except Exception as error:  # everything becomes a record
            result = {
                "status": "oom" if is_oom(error) else "error",
                "message": f"{type(error).__name__}: {str(error)[:2000]}",
                "traceback": traceback.format_exc()[-4000:],
            }
        sys.stdout.write("\n" + RESULT_MARKER + json.dumps(result, default=json_default) + "\n")
        sys.stdout.flush()
    return 0


def run_case_subprocess(module: str, case: dict[str, Any], timeout_s: float = 900.0,
                        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs ``python -m <module> --case-json '<case>'`` from the repository root and returns its record.

    The child's own record when it printed one; otherwise ``{"status": "oom"}`` when it was killed by
    SIGKILL (the OOM killer's signal), ``{"status": "timeout"}`` past ``timeout_s`` (its whole process
    group is killed), ``{"status": "error"}`` for anything else, with the tail of its stderr.
    """
    return run_cases_subprocess(module, [case], timeout_s, env)[0]


def run_cases_subprocess(module: str, cases: list[dict[str, Any]], timeout_s: float = 900.0,
                         env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Like :func:`run_case_subprocess` for several cases run one after the other in one child process
    (``timeout_s`` then bounds the whole child). Cases the child did not finish get the failure record."""
    payload = cases[0] if len(cases) == 1 else cases
    cmd = [sys.executable, "-m", module, "--case-json", json.dumps(payload)]
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        child_env.update(env)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    except BaseException:
        # Interrupted (the GPU session's phase budget sends SIGINT): the child runs in its own session, so
        # it would outlive this process and hold the GPU during the next phase.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    wall = time.perf_counter() - started

    records: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            try:
                records.append(json.loads(line[len(RESULT_MARKER):]))
            except json.JSONDecodeError as error:
                records.append({"status": "error", "message": f"unreadable result line: {error}"})
    if len(records) < len(cases):
        if timed_out:
            failure = {"status": "timeout", "message": f"killed after {timeout_s:.0f} s"}
        elif proc.returncode == -signal.SIGKILL:
            failure = {"status": "oom", "message": "killed by SIGKILL (most likely the kernel's OOM killer)"}
        elif proc.returncode is not None and proc.returncode < 0:
            failure = {"status": "error", "message": f"killed by signal {-proc.returncode}"}
        else:
            failure = {"status": "error", "message": f"exit status {proc.returncode} without a result"}
        failure["stderr_tail"] = (stderr or "")[-3000:]
        records += [dict(failure) for _ in range(len(cases) - len(records))]
    for record in records:
        record["process_wall_s"] = wall / len(cases)
        record["returncode"] = proc.returncode
    return records[: len(cases)]


def run_case_with_retry(module: str, case: dict[str, Any], timeout_s: float, retries: int = 3,
                        wait_s: float = 30.0) -> dict[str, Any]:
    """A case, run again (``retry_count(retries)`` times) when its backend was unavailable (the extension
    being rebuilt) or it failed to import."""
    retries = retry_count(retries)
    for attempt in range(retries + 1):
        result = run_case_subprocess(module, case, timeout_s=timeout_s)
        transient = result["status"] == "unavailable" and "did not load" in result.get("message", "")
        transient |= result["status"] == "error" and "import mlcontrast failed" in result.get("message", "")
        if not transient or attempt == retries:
            return result
        print(f"    {case['provider']} N={case['n']}: {result['message'][:200]}; retry in {wait_s:.0f} s", flush=True)
        time.sleep(wait_s)
    return result

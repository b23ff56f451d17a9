"""Several runs side by side on the CPU: each ``fit`` in its own spawned process.

On a small CPU machine two single-thread processes do more work than one two-thread process
(``benchmarks/``: about a third more images per second on 2 cores), so ``dpl-zoo train`` with
several methods runs them at once when there is no GPU and more than one core
(:func:`use_side_by_side`). Each child sets its torch thread count (cores / runs, at least 1)
before any work and runs the same :func:`~dpl_zoo.train.fit` as the sequential path, so a run
gives the numbers it gives alone at that thread count.

Children report through :class:`~dpl_zoo.progress.RemoteReporter` on one queue; the parent
shows everything through a :class:`~dpl_zoo.progress.RunBoard`. A child that fails sends its
exception, which the parent raises after stopping the other children (the same error, and exit
code, as the sequential path). Ctrl-C reaches only the parent (children ignore SIGINT), which
stops every child; each keeps the last checkpoint it wrote at an epoch end.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_lib
import signal
import time
import traceback
from typing import Optional, Sequence

from .errors import RunProcessError
from .progress import RemoteReporter, RunBoard

STOP_GRACE_S = 30.0   # how long a stopped child may take to unwind before it is killed
LIVENESS_S = 0.5      # how often the parent looks for a run whose process died
DRAIN_S = 2.0         # how long it reads a dead run's queued messages for its result


class _Stopped(BaseException):
    """Raised in a child by SIGTERM: the parent stops it (another run failed, or Ctrl-C)."""


class _ChildTraceback(Exception):
    """The traceback of an unexpected error in a child, shown under the error the parent raises."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container's
    cpuset), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def use_side_by_side(device_type: str, runs: int, sequential: bool = False) -> bool:
    """Several runs, on the CPU, more than one core, not under torchrun and not ``--sequential``."""
    from . import distributed as dist_utils
    under_torchrun = dist_utils.is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    return not sequential and runs > 1 and device_type == "cpu" and not under_torchrun and usable_cores() > 1


def threads_per_run(runs: int, cores: Optional[int] = None) -> int:
    return max(1, (cores or usable_cores()) // runs)


def _raise_stopped(signum, frame):
    raise _Stopped()


def _stop_when_orphaned() -> None:
    """SIGTERM to this process when its parent dies (killed without stopping its children)."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="dpl-zoo-parent-watch", daemon=True).start()


def _child(key: str, cfg, resume: Optional[str], threads: int, events) -> None:
    """One run in a spawned process; its last message is ``("done", key, summary)`` or
    ``("error", key, exception, traceback text)``; nothing when it was stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        _stop_when_orphaned()
        import torch
        torch.set_num_threads(threads)   # before any work: the run's numbers depend on it
        from .train import fit
        summary = fit(cfg, resume=resume, quiet=True, reporter=RemoteReporter(events.put, key))
    except _Stopped:
        events.cancel_join_thread()   # nobody may read what is still queued: exit without waiting on it
        return
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the run is over: nothing left to unwind
        from .errors import UserError, user_error_line
        # a user error's line is made here, where its causes still are (pickling drops them)
        line = user_error_line(e) if isinstance(e, Exception) else None
        if line is not None:
            _last_word(events, ("error", key, UserError(line), None))
            return
        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001 - an exception that cannot cross processes: its words can
            e = RuntimeError(f"{type(e).__name__}: {e}")
        _last_word(events, ("error", key, e, text))
        return
    _last_word(events, ("done", key, summary))


def _last_word(events, message: tuple) -> None:
    """Send the child's last message. From here on a stop needs no unwinding: the parent stops a
    child only after another run failed or on Ctrl-C, when this message is no longer needed."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    events.put(message)


def _describe_exit(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (often: out of memory)" if -code == signal.SIGKILL else "")
    return f"exited with code {code}"


def fit_side_by_side(runs: Sequence[tuple[str, object]], resume: Optional[str], board: RunBoard,
                     threads: int, resume_hint: str = "") -> list[dict]:
    """``fit`` of each ``(key, cfg)`` in ``runs`` in its own process, ``threads`` torch threads
    each; their summaries in the order of ``runs``. The first error of a run is raised here after
    every other run was stopped; ``resume_hint`` ends the message of a run whose process died."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    procs = {}
    results: dict[str, dict] = {}
    # children start with SIGINT ignored (kept through exec), so a Ctrl-C in the terminal, which
    # reaches the whole process group, interrupts the parent only, even during their start-up
    previous_int = _set_signal(signal.SIGINT, signal.SIG_IGN)
    # a parent stopped by SIGTERM (a job's time limit, CI cancelling) stops its children first
    previous_term = _set_signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        try:
            for key, cfg in runs:
                procs[key] = ctx.Process(target=_child, args=(key, cfg, resume, threads, events),
                                         name=f"dpl-zoo-{key}")
                procs[key].start()
        finally:
            _set_signal(signal.SIGINT, previous_int)
        checked = time.monotonic()
        while len(results) < len(procs):
            try:
                message = events.get(timeout=LIVENESS_S)
            except queue_lib.Empty:
                message = None
            if message is not None:
                _take(message, results, board)
            # the live runs send at every step: a dead one is looked for on a clock, not only when all is quiet
            if message is None or time.monotonic() - checked >= LIVENESS_S:
                _check_alive(procs, results, events, board, resume_hint)
                checked = time.monotonic()
        for proc in procs.values():
            proc.join()
    finally:
        _stop(procs)
        events.close()
        _set_signal(signal.SIGTERM, previous_term)
    return [results[key] for key, _ in runs]


def _set_signal(signum, handler):
    """``signal.signal`` where Python allows it (the main thread); the previous handler, or None."""
    import threading
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, handler)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _take(message: tuple, results: dict, board: RunBoard) -> None:
    kind, key = message[0], message[1]
    if kind == "done":
        results[key] = message[2]
        board.done(key, message[2])
    elif kind == "error":
        # a user error arrives as its line (main() shows it as the sequential path does); an
        # unexpected one shows the child's traceback under the parent's
        if message[3] is None:
            raise message[2]
        raise message[2] from _ChildTraceback(f"in the {key} run's process:\n{message[3]}")
    else:
        board.handle(message)


def _check_alive(procs: dict, results: dict, events, board: RunBoard, resume_hint: str) -> None:
    """A child that ended without its last message died (killed); what it sent before is read
    first (its result may still be on its way)."""
    for key, proc in procs.items():
        if key in results or proc.exitcode is None:
            continue
        # read what is queued (its own result may be there) for a bounded time: the live runs keep sending
        deadline = time.monotonic() + DRAIN_S
        while key not in results and time.monotonic() < deadline:
            try:
                _take(events.get(timeout=max(0.05, deadline - time.monotonic())), results, board)
            except queue_lib.Empty:
                break
        if key not in results:
            raise RunProcessError(f"the {key} run's process {_describe_exit(proc.exitcode)} before it finished; "
                                  f"the other runs were stopped, each keeps its last checkpoint (written at epoch "
                                  f"ends){resume_hint}")


def _stop(procs: dict) -> None:
    """Stop the children still running (SIGTERM: they unwind; their checkpoints stay as the last
    epoch end left them); kill those that do not end within ``STOP_GRACE_S``, or at once on a
    second Ctrl-C."""
    running = [p for p in procs.values() if p.is_alive()]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        for proc in running:
            proc.join(max(0.0, deadline - time.monotonic()))
    finally:
        for proc in running:
            if proc.is_alive():
                proc.kill()
                proc.join()

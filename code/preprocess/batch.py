"""The batch runner every converter shares: discovery, sharding, workers, resume, atomic writes,
a failure log, and a closing summary.

A converter is a picklable function ``convert(path) -> str | bytes`` that raises on bad input; the
runner never builds a shell command, so any file name the file system allows is fine. A worker
process that dies while converting a file (the OOM killer, a segfault in C code, ``os._exit``) or
that hangs past the timeout costs only that file, which is logged as failed like any other.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import signal
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

from fileio import DropLog, atomic_write_bytes, atomic_write_text, failure_log_path, find_files
from pools import process_context
from tqdm import tqdm

from preprocess.errors import ConversionError, describe_exception


def shard_of(relative_path: Path, num_shards: int) -> int:
    """Stable shard index of a file: the same on every machine and independent of the other files."""
    return zlib.crc32(relative_path.as_posix().encode("utf-8", "surrogateescape")) % num_shards


def select_shard(files: list[Path], num_shards: int, shard_index: int) -> list[Path]:
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard_index must be in [0, {num_shards}) and --num_shards >= 1")
    return [f for f in files if shard_of(f, num_shards) == shard_index]


@dataclass
class BatchSummary:
    converted: int = 0
    skipped: int = 0
    failures: DropLog = field(default_factory=lambda: DropLog("batch"))

    @property
    def failed(self) -> int:
        return len(self.failures)

    def line(self, name: str) -> str:
        return f"{name}: {self.converted} converted, {self.skipped} skipped (already done), {self.failed} failed"


@dataclass(frozen=True)
class _Task:
    source: Path
    target: Path
    relative: Path


_CONVERT: Callable | None = None
_MAX_BYTES: int = 0
_TIMEOUT: float = 0


def _init_worker(convert: Callable, max_bytes: int, timeout: float) -> None:
    global _CONVERT, _MAX_BYTES, _TIMEOUT
    _CONVERT, _MAX_BYTES, _TIMEOUT = convert, max_bytes, timeout
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _on_timeout(signum, frame):  # noqa: ARG001 - signal handler signature
    raise TimeoutError(f"took longer than {_TIMEOUT:g} s")


def _run_task(task: _Task) -> tuple[_Task, str, str, str]:
    """Convert one file; returns (task, status, stage, reason). Never raises for bad input."""
    try:
        size = task.source.stat().st_size
        if size == 0:
            raise ConversionError("empty file (0 bytes)", stage="read")
        if _MAX_BYTES and size > _MAX_BYTES:
            raise ConversionError(f"file too large ({size} bytes > limit {_MAX_BYTES})", stage="read")
        use_alarm = _TIMEOUT > 0 and hasattr(signal, "SIGALRM")
        if use_alarm:
            previous = signal.signal(signal.SIGALRM, _on_timeout)
            signal.setitimer(signal.ITIMER_REAL, _TIMEOUT)
        try:
            result = _CONVERT(task.source)
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        if result is None or len(result) == 0:
            raise ConversionError("the converter produced no output", stage="convert")
        if isinstance(result, bytes):
            atomic_write_bytes(task.target, result)
        else:
            atomic_write_text(task.target, result)
        return task, "converted", "", ""
    except ConversionError as exc:
        return task, "failed", exc.stage, exc.reason
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the batch
        return task, "failed", "convert", describe_exception(exc)


def _worker_main(conn: Connection, inherited: list[Connection], convert: Callable, max_bytes: int,
                 timeout: float) -> None:
    """A worker's life: take a task, send back its result, until told to stop or the parent is gone."""
    # A forked worker holds copies of the parent's pipe ends; without closing them a worker would
    # never see end-of-file once the parent is gone, and would wait forever.
    for other in inherited:
        other.close()
    _init_worker(convert, max_bytes, timeout)
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            conn.send(_run_task(task))
    except (EOFError, OSError):
        return  # the parent died or closed the pipe: nothing left to do


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            how = f"signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            how = f"signal {-exitcode}"
        hint = "; SIGKILL often means the out-of-memory killer" if exitcode == -signal.SIGKILL else ""
    else:
        how, hint = f"exit code {exitcode}", ""
    return f"worker process died ({how}) while converting this file{hint}"


def _remove_temporary_outputs(target: Path) -> None:
    """The temporary file a killed worker was writing (see fileio.atomic_write), so none is left behind."""
    for leftover in target.parent.glob(glob.escape(f".{target.name[:80]}.") + "????????.tmp"):
        try:
            leftover.unlink()
        except OSError:
            pass


# Tasks sent to a worker ahead of time: one running and one waiting hides the round trip between
# files without letting a slow worker hoard the queue.
_PREFETCH = 2
# How long after --timeout the parent kills a worker whose own alarm did not fire (a converter
# stuck in C code never returns to the interpreter, so SIGALRM's handler never runs).
_KILL_GRACE_S = 5.0
# A file whose worker dies is tried this many times in all before it is reported: the first death
# may not be its fault (the OOM killer picks the largest process, not the guilty one).
_ATTEMPTS = 2


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    pending: deque = field(default_factory=deque)  # tasks sent, in the order the worker runs them
    started: float = 0.0  # when pending[0] began running, as far as the parent can tell


class _WorkerPool:
    """Worker processes with one pipe each, so the parent knows which file each worker is on.

    Unlike ``multiprocessing.Pool``, a worker that dies (OOM killer, segfault, ``os._exit``) does
    not hang the batch: the file it was converting is retried once, then reported as failed, the
    worker is replaced, and the files it had been sent ahead of time go back to the queue.
    """

    def __init__(self, tasks: list[_Task], size: int, convert: Callable, max_bytes: int, timeout: float):
        self._ctx = process_context()
        self._fork = self._ctx.get_start_method() == "fork"
        self._args = (convert, max_bytes, timeout)
        self._timeout = timeout
        self._queue: deque[_Task] = deque(tasks)
        self._deaths: dict[Path, int] = {}
        self._workers: list[_Worker] = []
        for _ in range(min(size, len(tasks))):
            self._workers.append(self._start())
        for worker in self._workers:
            self._feed(worker)

    def _start(self) -> _Worker:
        parent_end, child_end = self._ctx.Pipe()
        inherited = [parent_end, *(w.conn for w in self._workers)] if self._fork else []
        process = self._ctx.Process(target=_worker_main, args=(child_end, inherited, *self._args),
                                    daemon=True, name="batch-worker")
        process.start()
        child_end.close()
        return _Worker(process, parent_end)

    def _feed(self, worker: _Worker) -> None:
        while self._queue and len(worker.pending) < _PREFETCH:
            task = self._queue.popleft()
            if not worker.pending:
                worker.started = time.monotonic()
            worker.pending.append(task)
            try:
                worker.conn.send(task)
            except OSError:
                return  # it died: its sentinel says so on the next wait, and the task is requeued

    def _collect(self, worker: _Worker) -> Iterator[tuple[_Task, str, str, str]]:
        """Results the worker has sent, without blocking."""
        while worker.pending:
            try:
                if not worker.conn.poll():
                    return
                result = worker.conn.recv()
            except (EOFError, OSError):
                return
            worker.pending.popleft()
            worker.started = time.monotonic()
            yield result

    def _retire(self, worker: _Worker, reason: str | None) -> Iterator[tuple[_Task, str, str, str]]:
        """Reap a dead (or killed) worker, settle the file it was on, requeue the rest, replace it."""
        worker.process.join()
        worker.conn.close()
        self._workers.remove(worker)
        if worker.pending:
            culprit = worker.pending.popleft()
            _remove_temporary_outputs(culprit.target)
            # Files sent ahead of time never started: back to the front, in their order.
            self._queue.extendleft(reversed(worker.pending))
            deaths = self._deaths[culprit.source] = self._deaths.get(culprit.source, 0) + 1
            if reason is not None:
                yield culprit, "failed", "timeout", reason
            elif deaths >= _ATTEMPTS:
                yield culprit, "failed", "worker", _death_reason(worker.process.exitcode)
            else:
                self._queue.appendleft(culprit)
        if self._queue:
            replacement = self._start()
            self._workers.append(replacement)
            self._feed(replacement)

    def results(self) -> Iterator[tuple[_Task, str, str, str]]:
        """Every task's (task, status, stage, reason), in the order they finish."""
        while self._workers:
            busy = [w for w in self._workers if w.pending]
            if not busy:
                break
            limit = None
            if self._timeout > 0:
                deadline = min(w.started for w in busy) + self._timeout + _KILL_GRACE_S
                limit = max(0.0, deadline - time.monotonic())
            ready = set(wait([o for w in busy for o in (w.conn, w.process.sentinel)], limit))
            now = time.monotonic()
            for worker in busy:
                if worker.conn in ready:
                    yield from self._collect(worker)
                if worker.process.sentinel in ready or not worker.process.is_alive():
                    yield from self._collect(worker)  # what it sent before it died still counts
                    yield from self._retire(worker, None)
                elif self._timeout > 0 and worker.pending and now - worker.started > self._timeout + _KILL_GRACE_S:
                    worker.process.kill()
                    yield from self._retire(worker, f"conversion timed out: no result after "
                                                    f"{now - worker.started:.0f} s, worker killed")
                else:
                    self._feed(worker)

    def close(self, abort: bool) -> None:
        """Stop the workers; ``abort`` kills them at once (after Ctrl-C or an error)."""
        for worker in self._workers:
            if abort:
                worker.process.kill()
            else:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        for worker in self._workers:
            worker.process.join(None if abort else 5)
            if worker.process.is_alive():  # a worker stuck in C code that never read the stop message
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers.clear()


def run_batch(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    convert: Callable[[Path], str | bytes],
    *,
    extensions: Iterable[str],
    output_name: Callable[[Path], Path],
    name: str,
    workers: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    error_log: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_bytes: int = 0,
    timeout: float = 0,
    progress: bool = True,
) -> BatchSummary:
    """Convert every matching file of this shard; see the module docstring.

    Files are converted in worker processes, even with ``workers=1``, so that a file that crashes
    its worker is reported as failed instead of ending (or, with a process pool, hanging) the batch.
    Only a process that may not have children (a daemonic one) converts in-process.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = select_shard(find_files(input_dir, extensions), num_shards, shard_index)
    summary = BatchSummary(failures=DropLog(name, error_log,
                                            echo=lambda message: tqdm.write(message, file=sys.stderr)))
    tasks = []
    for rel in files:
        target = output_dir / output_name(rel)
        if not overwrite and target.exists():
            summary.skipped += 1
        else:
            tasks.append(_Task(input_dir / rel, target, rel))
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    # The first workers are forked before tqdm starts its monitor thread: forking a threaded
    # process can deadlock the child. (A replacement for a dead worker is forked later; the only
    # other thread then is tqdm's monitor, whose lock the worker never takes.)
    pool = None
    if multiprocessing.current_process().daemon:
        _init_worker(convert, max_bytes, timeout)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        results: Iterable[tuple[_Task, str, str, str]] = map(_run_task, tasks)
    else:
        pool = _WorkerPool(tasks, workers, convert, max_bytes, timeout)
        results = pool.results()
    bar = tqdm(total=len(tasks), desc=name, unit="file", disable=not progress, dynamic_ncols=True)
    finished = False
    try:
        for task, status, stage, reason in results:
            bar.update(1)
            if status == "converted":
                summary.converted += 1
                continue
            summary.failures.fail(task.source, stage, reason)
        finished = True
    finally:
        if pool is not None:
            pool.close(abort=not finished)  # after an interrupt or error: no orphaned workers
        bar.close()
        summary.failures.close()
    return summary


def add_batch_arguments(parser: argparse.ArgumentParser, tool: str) -> None:
    """The options every batch script shares; ``tool`` names the default failure log
    (``fileio.failure_log_path``)."""
    default_log = failure_log_path(tool)
    parser.add_argument("input_dir", help="folder searched recursively for input files")
    parser.add_argument("output_dir", help="outputs mirror the input folder structure here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores)")
    parser.add_argument("--num_shards", type=int, default=1, help="split the file list into K shards")
    parser.add_argument("--shard_index", type=int, default=0, help="which shard this process handles")
    parser.add_argument("--error_log", default=default_log,
                        help=f"JSONL log of failures: file, stage, reason (default: {default_log})")
    parser.add_argument("--overwrite", action="store_true", help="redo files whose output already exists")
    parser.add_argument("--max_mb", type=float, default=64.0,
                        help="inputs larger than this many MiB are reported and skipped (0 = no limit)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds allowed per file before it is reported as failed (0 = no limit)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any file failed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace, convert: Callable, *, extensions: Iterable[str],
                  output_name: Callable[[Path], Path], name: str) -> int:
    """Run a batch from ``add_batch_arguments`` options, print the summary, return the exit status."""
    if not Path(args.input_dir).is_dir():
        print(f"error: input directory not found: {args.input_dir}", file=sys.stderr)
        return 2
    try:
        select_shard([], args.num_shards, args.shard_index)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = run_batch(
        args.input_dir, args.output_dir, convert, extensions=extensions, output_name=output_name,
        name=name, workers=args.workers, num_shards=args.num_shards, shard_index=args.shard_index,
        error_log=args.error_log, overwrite=args.overwrite, max_bytes=int(args.max_mb * 2**20),
        timeout=args.timeout, progress=not args.quiet,
    )
    print(summary.line(name) + (f" (errors logged to {args.error_log})" if summary.failed and args.error_log else ""))
    return 1 if args.strict and summary.failed else 0

"""Sharded outputs and the Dask clusters that write them (``--workers`` / ``--scheduler``).

``chemtwin generate``, ``ingest`` and ``embed`` can split their work into shards: shard k is one
task that writes ``OUT/shard-0000k.h5`` (under a temporary name, renamed when complete) and
returns its record (rows, plus what the command wants back); the size and sha256 of the file are
added on the worker.  The driver appends each record to ``OUT/.progress.jsonl`` as it arrives and
writes ``OUT/manifest.json`` (``chemtwin.data.dataset``) only when every shard is done, so no
reader ever sees a manifest that points at a missing or half-written shard.

A failed task (an exception, a killed worker) stops the run with one line naming the shard; the
finished shards stay.  Rerunning the same command resumes: a shard whose file still matches its
recorded checksum is kept (checked on the workers, in parallel), the others are written again.
Another command into the same folder needs ``--overwrite``.

Tasks run on Dask (``dask.distributed``): a ``LocalCluster`` of N single-threaded worker
processes, or an existing cluster whose workers see OUT at the same path (a shared filesystem).
Without a client they run one after another in this process: the same code path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from chemtwin import __version__
from chemtwin.core.files import (
    describe_error,
    file_sha256,
    json_safe,
    json_text,
    left_by_ended_process,
    prepare_output,
)
from chemtwin.data.shard_folder import (
    MANIFEST,
    new_manifest,
    write_manifest,
)
from chemtwin.errors import InputError

log = logging.getLogger(__name__)

PROGRESS = ".progress.jsonl"  # header line (kind + plan), then one record per finished shard
SHARD_NAME = "shard-{:05d}.h5"






def _probe(address: str, timeout: float) -> None:
    """Fail fast on a bad scheme or a closed port: a Dask client that fails to start would
    complain again from its destructor, seconds later."""
    from distributed.comm.addressing import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend

    scheme, _ = parse_address(address)
    get_backend(scheme)  # ValueError for an unknown scheme
    if scheme in ("tcp", "tls"):
        socket.create_connection(get_address_host_port(address), timeout=timeout).close()


SCRATCH_PREFIX = "chemtwin-dask-"


def _remove_stale_scratch() -> None:
    """Delete the scratch folders (``chemtwin-dask-PID-*`` in TMPDIR) of local clusters whose
    process no longer runs (killed with SIGKILL)."""
    for stale in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = stale.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if left_by_ended_process(pid):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None, timeout: float = 10.0):
    """A ``distributed.Client``: on a new local cluster of ``workers`` processes (closed on
    exit), or connected to ``scheduler``; InputError when that cannot be reached."""
    if workers is not None and scheduler is not None:
        raise InputError("give workers or scheduler, not both", "workers", "scheduler")
    if workers is not None and workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}", "workers")
    if not timeout > 0:
        raise InputError(f"connect_timeout must be positive, got {timeout}", "connect_timeout")
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("workers/scheduler need Dask: pip install 'chemtwin[distributed]'", "workers", "scheduler") from None
    dask_log = logging.getLogger("distributed")  # its INFO lines would drown the progress bar
    dask_log.setLevel(max(dask_log.getEffectiveLevel(), logging.WARNING))
    if scheduler is not None:
        try:
            _probe(scheduler, timeout)
            client = Client(scheduler, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler} within {timeout:g} s "
                             f"({describe_error(exc, 120)})") from None
        with client:
            yield client
        return
    # Worker logs silenced: a failed task comes back as one line from run_shards.  Dask gives
    # its workers MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's mmap threshold: every
    # spectrum-sized array is then mapped and page-faulted anew, and a generate shard took 2.5x
    # as long (docs/distributed.md).  Our workers keep glibc's defaults (the user's own
    # environment variable, if set, still wins).
    # The cluster's scratch space is a folder of ours, removed with the cluster (Dask's default
    # leaves TMPDIR/dask-scratch-space behind), and by the next run when this one was killed.
    # The scheduler always serves HTTP; ":0" picks a free port instead of warning on stderr when
    # 8787 is taken (another cluster, another run).
    _remove_stale_scratch()
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch, \
            dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                             "temporary-directory": scratch}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                         local_directory=scratch, silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


# ---------------------------------------------------------------- the shard runner
def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _still_valid(path: str, expected: dict) -> bool:
    if not expected.get("rows"):
        return True  # an empty shard has no file
    p = Path(path)
    return p.is_file() and p.stat().st_size == expected.get("bytes") and file_sha256(p) == expected.get("sha256")


def run_shard(task: Callable, spec: dict, path: str, expected: dict | None) -> dict:
    """On a worker: keep the shard at ``path`` if it matches ``expected`` (the record of an
    earlier run), else run ``task(spec, path)``; the record gets the file's size and sha256."""
    if expected is not None and _still_valid(path, expected):
        return {**expected, "reused": True}
    t0 = time.perf_counter()
    record = dict(task(spec, path))
    if record["rows"]:
        record.update(bytes=os.path.getsize(path), sha256=file_sha256(path))
    record.update(path=os.path.basename(path), seconds=round(time.perf_counter() - t0, 3), peak_rss=_peak_rss(),
                  reused=False)
    return record


def _read_progress(path: Path) -> tuple[dict | None, dict[int, dict]]:
    """(header, {shard: record}) of a progress log; a torn last line (killed driver) is ignored."""
    header, records = None, {}
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if header is None:
            header = item
        elif isinstance(item, dict) and "index" in item:
            records[int(item["index"])] = item
    return header, records


def _clear(out: Path) -> None:
    """Remove what a sharded run wrote into ``out`` (the manifest first: the folder stops being a dataset)."""
    (out / MANIFEST).unlink(missing_ok=True)
    for pattern in ("shard-*.h5", ".shard-*", PROGRESS):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def _prepare(out: Path, header: dict, overwrite: bool) -> dict[int, dict]:
    """Make ``out`` ready for the run described by ``header``; the records of the shards an
    interrupted run of the same plan finished."""
    if out.exists() and not out.is_dir():
        if not overwrite:
            raise InputError(f"{out} exists; pass overwrite=True to replace it", "overwrite")
        out.unlink()
    if out.is_dir():
        manifest, progress = out / MANIFEST, out / PROGRESS
        if manifest.exists():
            if not overwrite:
                raise InputError(f"{out} exists; pass overwrite=True to replace it", "overwrite")
            _clear(out)
        elif progress.exists():
            old_header, records = _read_progress(progress)
            if old_header == json_safe(header):
                log.info("resuming the unfinished run in %s (%d shard(s) done before)", out, len(records))
                return records
            if not overwrite:
                raise InputError(f"{out} holds an unfinished run with other settings; pass overwrite=True to start again", "overwrite")
            _clear(out)
        elif any(out.iterdir()):
            raise InputError(f"{out} is a folder that holds no chemtwin shards; refusing to write into it")
    else:
        prepare_output(out, overwrite)
        out.mkdir()
    with open(out / PROGRESS, "w") as fh:
        fh.write(json_text(header, None) + "\n")
    return {}


def _execute(task, jobs: list[tuple], client) -> Iterator[tuple[int, dict]]:
    """(shard, record) as shards finish; the first failure raises ``_Failed``."""
    if client is None:
        for k, job in enumerate(jobs):
            try:
                yield k, run_shard(task, *job)
            except Exception as exc:
                raise _Failed(k, exc) from exc
        return
    from distributed import as_completed

    futures = client.map(run_shard, [task] * len(jobs), *zip(*jobs), pure=False)
    index = {f.key: k for k, f in enumerate(futures)}
    try:
        for future in as_completed(futures, loop=client.loop):
            if future.status == "error":
                raise _Failed(index[future.key], future.exception())
            yield index[future.key], future.result()
    finally:
        client.cancel([f for f in futures if not f.done()])


class _Failed(Exception):
    def __init__(self, k: int, exc: BaseException):
        super().__init__(k, exc)
        self.k, self.exc = k, exc


def run_shards(out, kind: str, plan: dict, specs: list[dict], task: Callable, client=None, *, header: dict | None = None,
               overwrite: bool = False, progress: bool = True, desc: str = "shards") -> tuple[dict | None, list[dict]]:
    """Write one shard per spec with ``task(spec, path) -> {"rows": n, ...}`` (a module-level
    function, so that Dask workers can import it) and then the manifest.

    ``kind``: 'dataset' or 'latents'; ``plan``: JSON-able settings that decide the output (a
    rerun with the same plan resumes); ``header``: extra manifest fields (e.g. the pixel grid).
    Returns (manifest, records in shard order); the manifest is None, and the folder removed,
    when no shard holds a row.
    """
    out = Path(out).absolute()
    run_header = {"kind": kind, "plan": plan, "chemtwin_version": __version__, "shards": len(specs)}
    previous = _prepare(out, run_header, overwrite)

    jobs = [(spec, str(out / SHARD_NAME.format(k)), previous.get(k)) for k, spec in enumerate(specs)]
    records: list[dict | None] = [None] * len(specs)
    with open(out / PROGRESS, "a") as fh, tqdm(total=len(specs), desc=desc, unit="shard", disable=not progress) as bar:
        try:
            for k, record in _execute(task, jobs, client):
                records[k] = {**record, "index": k}
                fh.write(json_text(records[k], None) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                bar.update(1)
        except _Failed as failure:
            done = sum(r is not None for r in records)
            raise InputError(f"shard {failure.k} ({SHARD_NAME.format(failure.k)}) failed: "
                             f"{describe_error(failure.exc, 200)}; {done} of {len(specs)} shards are finished and kept "
                             f"in {out}: rerun the same command to write the rest") from None
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM reach the workers too: they stop mid-shard
            _remove_worker_temporaries(out)
            raise
    reused = sum(bool(r.get("reused")) for r in records)
    if reused:
        log.info("kept %d shard(s) of the earlier run (checksums verified)", reused)
    for orphan in out.glob(".shard-*"):  # temporary files of tasks killed in an earlier run
        orphan.unlink(missing_ok=True)
    n_rows = sum(r["rows"] for r in records)
    if n_rows == 0:
        (out / PROGRESS).unlink(missing_ok=True)
        if not any(out.iterdir()):
            out.rmdir()
        return None, records
    manifest = new_manifest(kind, [r for r in records if r["rows"]], n_rows=n_rows, **(header or {}), plan=plan)
    write_manifest(out, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest, records




def _remove_worker_temporaries(out: Path, wait_s: float = 10.0) -> None:
    """Delete the shard temporaries (``.shard-*.tmp-PID``) left by workers stopped with this run,
    waiting up to ``wait_s`` for their processes to end (a file whose writer still runs after
    that is left to the next run, which clears ``.shard-*`` files)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for tmp in out.glob(".shard-*.tmp-*"):
            if left_by_ended_process(tmp.name.rsplit("-", 1)[-1]):
                tmp.unlink(missing_ok=True)
            else:
                left.append(tmp)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive pieces of ``size`` (the last one shorter) covering range(n)."""
    if size < 1:
        raise InputError(f"shard_size must be >= 1, got {size}", "shard_size")
    return [(a, min(a + size, n)) for a in range(0, n, size)]

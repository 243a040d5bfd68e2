"""`goml task export`: finished tasks as JSON lines, so an operator can archive them
before retention prunes them (goml.cluster.duties, "Retention").

Pages through `List` in finish order (`finished=true`), from `finished_after_seq` up to
the last finished_seq the first page reports: tasks that finish while the export runs
wait for the next one, so an export ends and says exactly what it holds
(finished_seq `since + 1` .. `through`).

With `ack`, the file is written to a temporary name, fsync'd and renamed into place
before the cluster is told (`AckExport(through)`); only then may retention with
`require_export` prune those tasks. An export that dies before the ack has archived
nothing as far as the cluster knows, and the next one starts from the same place. By
default an acknowledged export starts at the export watermark, so consecutive
`--ack` exports are contiguous and every task is in exactly one file.

One line per task, keys sorted:
  id, finished_seq, state, spec {function, args, resources, priority, max_attempts,
  timeout_ms, idempotency_key, cloud, region}, result (JSON, or null), error,
  submitted_ms, finished_ms, attempts, epoch, agent_id (the agent of its last lease).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from goml.client import LIST_PAGE_MAX, Client
from goml.proto import api_pb2

EXPORT_PAGE_TASKS = 1000  # per List call; a page of 256 KiB results stays far below 64 MiB


class ExportError(Exception):
    """An export that cannot be done as asked (the message says why)."""


@dataclass(frozen=True)
class ExportSummary:
    tasks: int
    since_seq: int  # tasks with finished_seq in (since_seq, through_seq] were read
    through_seq: int
    pruned_through_seq: int  # as of the last page read
    watermark_seq: int  # the export watermark after this export (moved only by ack)
    gap: bool  # tasks in the range were pruned before this export could read them


def task_record(task: api_pb2.Task) -> dict[str, object]:
    """One exported line, as a dict (JSON values parsed, so `jq` reads them)."""
    spec = task.spec
    return {
        "id": task.id,
        "finished_seq": int(task.finished_seq),
        "state": api_pb2.TaskState.Name(task.state),
        "spec": {
            "function": spec.function,
            "args": json.loads(spec.args_json or "{}"),
            "resources": {
                "cpu": spec.resources.cpu,
                "memory_mb": int(spec.resources.memory_mb),
                "gpu": int(spec.resources.gpu),
            },
            "priority": int(spec.priority),
            "max_attempts": int(spec.max_attempts),
            "timeout_ms": int(spec.timeout_ms),
            "idempotency_key": spec.idempotency_key,
            "cloud": spec.cloud or None,
            "region": spec.region or None,
        },
        "result": json.loads(task.result_json) if task.result_json else None,
        "error": task.error or None,
        "submitted_ms": int(task.submitted_ms),
        "finished_ms": int(task.finished_ms),
        "attempts": int(task.attempts),
        "epoch": int(task.epoch),
        "agent_id": task.agent_id or None,
    }


def _pages(client: Client, since_seq: int, page_tasks: int) -> Iterator[api_pb2.ListResponse]:
    token = ""
    while True:
        page = client.list_page(
            limit=page_tasks, page_token=token, finished=True, finished_after_seq=since_seq
        )
        yield page
        token = page.next_page_token
        if not token:
            return


def export_finished(
    client: Client,
    out: Path | None,
    since_seq: int | None,
    ack: bool,
    page_tasks: int = EXPORT_PAGE_TASKS,
) -> ExportSummary:
    """Write finished tasks to `out` (None: stdout). `since_seq` None: from the export
    watermark when acknowledging, else from the oldest task kept."""
    assert 1 <= page_tasks <= LIST_PAGE_MAX, page_tasks
    if ack and out is None:
        raise ExportError("--ack needs --out FILE: the archive must be on disk before the ack")
    if out is not None and out.exists():
        raise ExportError(f"{out}: exists; an archive is never overwritten (name a new file)")
    first = client.list_page(limit=1, finished=True, finished_after_seq=0)
    watermark = int(first.export_watermark_seq)
    if since_seq is None:
        since_seq = watermark if ack else 0
    if ack and since_seq > watermark:
        raise ExportError(
            f"--since {since_seq} with --ack: the export watermark is {watermark}, so tasks "
            f"{watermark + 1}..{since_seq} would be acknowledged without being in this file"
        )
    if out is None:
        count, through, pruned, gap = _write(client, sys.stdout, since_seq, page_tasks)
        return ExportSummary(count, since_seq, through, pruned, watermark, gap)
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: no such directory")
    partial = out.with_name(f".{out.name}.partial")
    try:
        handle = open(partial, "x", encoding="utf-8")  # noqa: SIM115 (the `with` below closes it)
    except FileExistsError:
        raise ExportError(
            f"{partial} exists: another export to {out} is running, or one died (remove it)"
        ) from None
    try:
        with handle:
            count, through, pruned, gap = _write(client, handle, since_seq, page_tasks)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(partial, out)  # fails if `out` appeared meanwhile: never overwrite
    finally:
        partial.unlink(missing_ok=True)
    _fsync_directory(out.parent)
    if ack and through > watermark:
        watermark = client.ack_export(through)
    return ExportSummary(count, since_seq, through, pruned, watermark, gap)


def _write(
    client: Client, handle: IO[str], since_seq: int, page_tasks: int
) -> tuple[int, int, int, bool]:
    """Write the pages; (tasks written, through_seq, pruned_through_seq, gap)."""
    count = 0
    through: int | None = None
    last_seq = since_seq
    pruned = 0
    gap = False
    for page in _pages(client, since_seq, page_tasks):
        if through is None:
            through = int(page.finished_seq_last)
        pruned = int(page.pruned_through_seq)
        # Pruned before we read it: finished_seq last_seq + 1 .. pruned are gone.
        gap = gap or pruned > last_seq
        done = False
        for task in page.tasks:
            if task.finished_seq > through:
                done = True
                break
            if task.finished_seq <= last_seq:
                raise ExportError(
                    f"the cluster returned task {task.id} (#{task.finished_seq}) after "
                    f"#{last_seq}: not in finish order; nothing was acknowledged"
                )
            handle.write(json.dumps(task_record(task), sort_keys=True) + "\n")
            last_seq = int(task.finished_seq)
            count += 1
        if done:
            break
    assert through is not None
    return count, max(through, since_seq), pruned, gap


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

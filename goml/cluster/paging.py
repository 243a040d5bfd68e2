"""Pages of `List`, sans-IO: which tasks one page holds and the token of the next.

Three orders (`ListRequest`): submit order (oldest first, the default), submit order
newest first, and finish order (`finished`: terminal tasks only, what `goml task export`
pages through). A page token names the order, the position after which the next page
starts (a task's seq, or its finished_seq) and a check of the filters, so a token handed
back with other filters or another order is refused rather than silently misread.

Positions, not offsets: a task submitted, finished or pruned between two pages moves no
other task, so paging neither skips nor repeats one. Tasks submitted after a page was
read appear on later pages in submit order; in finish order, tasks finishing meanwhile
come at the end (their finished_seq is higher), which is what an incremental export wants.
"""

from __future__ import annotations

import hashlib

from goml.api.types import ListRequest
from goml.cluster.manifest import Manifest, Task

_ORDERS = ("o", "n", "f")  # oldest first, newest first, finish order
_CHECK_HEX_CHARS = 8
PAGE_TOKEN_CHARS_MAX = 64


class PageTokenError(ValueError):
    """A page token this code did not give for these filters: the caller's mistake."""


def _order(request: ListRequest) -> str:
    if request.finished:
        return "f"
    return "n" if request.newest_first else "o"


def _check(request: ListRequest) -> str:
    state = request.state.value if request.state is not None else ""
    text = f"{_order(request)}\0{state}\0{request.function}\0{request.agent_id}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_CHECK_HEX_CHARS]


def page_token(request: ListRequest, position: int) -> str:
    assert position >= 0
    token = f"{_order(request)}.{position}.{_check(request)}"
    assert len(token) <= PAGE_TOKEN_CHARS_MAX
    return token


def _position(request: ListRequest) -> int | None:
    """Where the page starts (None: at the beginning of its order)."""
    token = request.page_token
    if not token:
        return None
    if len(token) > PAGE_TOKEN_CHARS_MAX:
        raise PageTokenError(f"page_token: {len(token)} characters; a token has at most 64")
    order, _, rest = token.partition(".")
    digits, _, check = rest.partition(".")
    if order not in _ORDERS or not digits.isascii() or not digits.isdigit():
        raise PageTokenError(f"page_token {token!r:.80}: not a token a goml node gave")
    if order != _order(request) or check != _check(request):
        raise PageTokenError(
            f"page_token {token!r:.80}: given for another order or other filters; "
            "page on with the request that returned it"
        )
    return int(digits)


def list_page(manifest: Manifest, request: ListRequest, limit: int) -> tuple[tuple[Task, ...], str]:
    """The tasks of the page `request` asks for, at most `limit`, and the next page's
    token ("" when this page is the last)."""
    assert limit >= 1
    if request.finished and request.newest_first:
        raise PageTokenError("finished and newest_first: finish order runs oldest first only")
    if request.finished_after_seq < 0:
        raise PageTokenError(f"finished_after_seq={request.finished_after_seq}: must be >= 0")
    position = _position(request)
    state, function = request.state, request.function or None
    agent_id = request.agent_id or None
    last: int | None
    if request.finished:
        tasks = manifest.list_tasks(
            limit=limit,
            state=state,
            function=function,
            agent_id=agent_id,
            finished_after_seq=request.finished_after_seq if position is None else position,
        )
        last = tasks[-1].finished_seq if tasks else None
    else:
        tasks = manifest.list_tasks(
            limit=limit,
            state=state,
            function=function,
            agent_id=agent_id,
            after_seq=-1 if position is None or request.newest_first else position,
            newest_first=request.newest_first,
            before_seq=position if request.newest_first else None,
        )
        last = tasks[-1].seq if tasks else None
    # A full page may be followed by more; a short one is the last.
    if len(tasks) < limit or last is None:
        return tasks, ""
    return tasks, page_token(request, last)

# The batched UDP port's C loop (_hotloop.c); built by setup.py where it can be.
from typing import Any

MMSGHDR_SIZE: int
IOVEC_SIZE: int

def answer_known(
    count: int,
    headers: Any,
    data: Any,
    names: Any,
    iovecs: Any,
    out: Any,
    clients: dict[bytes, Any],
    ip_start: int,
    ip_stop: int,
    slot: int,
    name_slot: int,
    negative: tuple[Any, ...] | None,
    /,
) -> list[int]: ...
def serve(
    fixed: tuple[Any, ...], clients: dict[bytes, Any], negative: tuple[Any, ...] | None, /
) -> tuple[int, list[int] | None, int, int]: ...

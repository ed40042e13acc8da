"""One writer at a time: a lock file beside the store for each thing being written.

A capture holds `<store>.locks/capture.lock`; an analysis holds `<store>.locks/<job>-<name>.lock`
while it computes and moves its result into place. The file is created atomically (O_EXCL)
and records who holds it (host, pid, command) and since when; a second writer gets one
sentence naming the holder. A lock left by a process that died on this host is noticed (its
pid is gone) and taken over. The files live beside the store, not in it, so the store stays
a clean Zarr hierarchy. Object stores (s3://, ...) have no atomic create: there, nothing is
locked and concurrent writers are the user's to avoid (the README says so).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path

from .errors import StoreLockedError


def lock_dir(store: str) -> Path:
    return Path(str(store).rstrip("/") + ".locks")


def alive(pid: int) -> bool:
    """Whether a process of this host with that pid still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holders(store: str) -> list[dict]:
    """Who holds locks on `store` now (stale locks of dead local processes left out)."""
    found = []
    for path in sorted(lock_dir(store).glob("*.lock")) if "://" not in str(store) else []:
        info = _read(path)
        if not _stale(info):
            found.append({**info, "lock": path.stem})
    return found


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # being written this instant, or unreadable: treat as held


def _stale(info: dict) -> bool:
    return info.get("host") == socket.gethostname() and "pid" in info and not alive(int(info["pid"]))


def _sentence(store: str, info: dict, path: Path) -> str:
    who = info.get("command") or "another stratascope process"
    where = f"pid {info['pid']} on {info['host']}" if "pid" in info else "a process"
    since = f" since {info['since'][:19]}Z" if info.get("since") else ""
    return (f"{store} is being written by {who} ({where}{since}); wait for it to finish, or if that process is "
            f"gone, delete {path}")


@contextlib.contextmanager
def hold(store: str, what: str, exclusive: bool = False):
    """Hold the lock `what` on `store` for the block. exclusive: also refuse while anything else
    on the store is locked (a capture that replaces the store must not pull it from under a job)."""
    if "://" in str(store):
        yield
        return
    directory = lock_dir(store)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{what}.lock"
    info = {"host": socket.gethostname(), "pid": os.getpid(), "what": what,
            "since": datetime.datetime.now(datetime.UTC).isoformat(),
            "command": " ".join(["stratascope", *sys.argv[1:3]]) if sys.argv and "stratascope" in sys.argv[0]
            else f"a {what.split('-')[0]} (Python)"}
    for attempt in (0, 1):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            held = _read(path)
            if attempt == 0 and _stale(held):
                path.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            raise StoreLockedError(_sentence(store, held, path)) from None
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    try:
        if exclusive:
            others = [h for h in holders(store) if h["lock"] != what]
            if others:
                raise StoreLockedError(_sentence(store, others[0], directory / f"{others[0]['lock']}.lock"))
        yield
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when no other lock is left

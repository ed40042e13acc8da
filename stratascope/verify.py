"""`stratascope verify`: every chunk of a store present and intact, and the shard records consistent.

Each array's chunk grid comes from its metadata; every chunk of a capture array must exist
when the capture recorded every chunk written, and every stored chunk's bytes must pass
`checked_store.chunk_problem` (its checksum, or for older stores its blosc length). Arrays
packed with Zarr's sharding codec are read shard by shard instead, which checks the
checksums of their inner chunks. The outcome is recorded in the root attrs (`verified`).
"""

from __future__ import annotations

import datetime
import itertools
import math

import zarr

from .checked_store import chunk_problem, codecs_of, dense
from .errors import DamagedStoreError
from .progress import tqdm
from .schemas import consolidate
from .store import every_chunk_written, root_attrs

MAX_LISTED = 20


def _arrays(root: zarr.Group) -> list[tuple[str, dict]]:
    """(path, metadata) of every array in the store, staging groups of running jobs left out."""
    found = []
    for path, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array) and "/_staging/" not in f"/{path}/":
            found.append((path, node.metadata.to_dict()))
    return sorted(found)


def _chunk_keys(path: str, meta: dict) -> list[str]:
    shape = meta["shape"]
    grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
    sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    counts = [max(1, math.ceil(s / c)) if s else 0 for s, c in zip(shape, grid)]
    if not shape:
        return [f"{path}/c"]
    return [f"{path}/c{sep}" + sep.join(map(str, idx)) for idx in itertools.product(*[range(n) for n in counts])]


def verify_store(path: str, progress: bool = True) -> dict:
    """Check the whole store at `path`; returns {'arrays', 'chunks', 'problems': [sentences]}."""
    attrs = root_attrs(path)
    require_all = every_chunk_written(attrs)
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    store = root.store
    arrays = _arrays(root)
    plans = [(p, m, _chunk_keys(p, m)) for p, m in arrays]
    problems: list[str] = []
    total = sum(len(keys) for _, _, keys in plans)
    with tqdm(total=total, unit="chunk", desc="verify", disable=not progress) as bar:
        for array, meta, keys in plans:
            codecs = codecs_of(meta)
            if "sharding_indexed" in codecs:
                problems += _check_sharded(root[array], array, meta, store, keys, require_all)
                bar.update(len(keys))
                continue
            for key in keys:
                data = _read(store, key)
                if data is None:
                    if require_all and dense(array):
                        problems.append(f"chunk {key.split('/c')[-1].lstrip('/')} of '{array}' is missing")
                elif problem := chunk_problem(data, codecs):
                    problems.append(f"chunk {key.split('/c')[-1].lstrip('/')} of '{array}': {problem}")
                bar.update(1)
    if "shard_complete" in root and attrs.get("complete") and not bool(root["shard_complete"][:].all()):
        problems.append("the store says it is complete but some shards are not recorded complete")
    _record(path, problems)
    return {"arrays": len(arrays), "chunks": total, "problems": problems}


def _read(store, key: str) -> bytes | None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _check_sharded(array: zarr.Array, name: str, meta: dict, store, keys: list[str], require_all: bool) -> list[str]:
    grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
    out = []
    for key, idx in zip(keys, itertools.product(*[range(max(1, math.ceil(s / c))) for s, c in
                                                   zip(meta["shape"], grid)])):
        if _read(store, key) is None:
            if require_all and dense(name):
                out.append(f"shard {'/'.join(map(str, idx))} of '{name}' is missing")
            continue
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, grid, meta["shape"]))
        try:
            array[region]
        except Exception as e:
            out.append(f"shard {'/'.join(map(str, idx))} of '{name}' cannot be read: {str(e).splitlines()[0]}")
    return out


def _record(path: str, problems: list[str]) -> None:
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    group.attrs["verified"] = {"at": datetime.datetime.now(datetime.UTC).isoformat(),
                               "ok": not problems, "problems": len(problems)}
    consolidate(path)


def summary(path: str, report: dict) -> str:
    """One paragraph for the command line."""
    if not report["problems"]:
        return (f"{path}: all {report['chunks']} chunks of {report['arrays']} arrays are present and intact, "
                "and the shard records agree")
    listed = "\n".join(f"  {p}" for p in report["problems"][:MAX_LISTED])
    more = len(report["problems"]) - MAX_LISTED
    return (f"{listed}" + (f"\n  ... and {more} more" if more > 0 else "") +
            f"\n{path}: {len(report['problems'])} of {report['chunks']} chunks are damaged or missing; capture "
            "again with --overwrite (an interrupted capture: the same command plus --resume), or restore the store "
            "from a copy")


def raise_if_damaged(path: str, report: dict) -> None:
    if report["problems"]:
        raise DamagedStoreError(summary(path, report))



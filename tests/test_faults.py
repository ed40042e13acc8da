"""Damaged stores: a deleted, truncated or bit-flipped chunk of any array kind is one sentence
naming the array and the chunk, never a wrong answer or a crash; `verify` finds each."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import stratascope as ss
from conftest import PROMPTS, fail_chunk_write
from stratascope.cli import cli
from stratascope.errors import DamagedStoreError

ARRAYS = ["hidden", "attention", "mlp", "token_id", "token_str", "readout/unembed"]


@pytest.fixture(scope="module")
def pristine(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "r.zarr"
    ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(out), capture="hidden,attention,mlp",
               progress=False)
    return out


def _damage(store, array: str, how: str):
    chunk = sorted((store / array / "c").rglob("*"))
    chunk = [c for c in chunk if c.is_file()][0]
    data = chunk.read_bytes()
    if how == "delete":
        chunk.unlink()
    elif how == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 0x10
        chunk.write_bytes(bytes(flipped))


def _read(path: str, array: str):
    run = ss.open_run(path)
    if array.startswith("readout/"):
        return run.readout[array.split("/")[1]].values
    return run.ds[array].values


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
@pytest.mark.parametrize("array", ARRAYS)
def test_damage_is_one_sentence_naming_the_chunk(pristine, tmp_path, array, how):
    store = tmp_path / "copy.zarr"
    shutil.copytree(pristine, store)
    _damage(store, array, how)
    with pytest.raises(DamagedStoreError, match=rf"chunk 0(/0)* of array '{array}' is (missing|damaged)"):
        _read(str(store), array)
    result = CliRunner().invoke(cli, ["verify", str(store)])
    assert result.exit_code == 1 and f"of '{array}'" in result.output and "1 of" in result.output


def test_truncated_chunk_in_a_subprocess_never_segfaults(pristine, tmp_path):
    """The report over a store with a truncated attention chunk exits 1 with a sentence (not 139)."""
    store = tmp_path / "copy.zarr"
    shutil.copytree(pristine, store)
    _damage(store, "attention", "truncate")
    done = subprocess.run([sys.executable, "-m", "stratascope", "report", str(store), "-o", str(tmp_path / "r.html")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "of array 'attention' is damaged" in done.stderr and "Traceback" not in done.stderr


def test_intact_store_verifies_and_reads_the_same(pristine, tiny_model_dirs):
    result = CliRunner().invoke(cli, ["verify", str(pristine)])
    assert result.exit_code == 0 and "present and intact" in result.output
    info = CliRunner().invoke(cli, ["info", str(pristine)]).output
    assert "verified   20" in info and "intact" in info
    run = ss.open_run(str(pristine))
    assert np.isfinite(run.ds["hidden"].values).all()


def test_disk_full_mid_capture_is_one_sentence_and_resumes_identically(tiny_model_dirs, tmp_path, monkeypatch):
    """ENOSPC while a shard is written (injected at a chunk file's write): one sentence naming the array
    and the fix; the store stays incomplete and `--resume` finishes it bit for bit."""
    import errno


    opts = dict(capture="hidden,mlp", batch_size=2, device="cpu", progress=False, shard_tokens=16)
    reference = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(tmp_path / "ref.zarr"),
                           **opts)
    fail_chunk_write(monkeypatch, "mlp", 2, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "full.zarr"
    result = CliRunner().invoke(cli, ["capture", "--model", str(tiny_model_dirs["llama"]), "--corpus",
                                      str(_corpus(tmp_path)), "--out", str(out), "--capture", "hidden,mlp",
                                      "--batch-size", "2", "--device", "cpu", "--shard-tokens", "16"])
    monkeypatch.undo()
    assert result.exit_code == 1 and "no space left on the disk while writing 'mlp'" in result.output
    assert "--resume" in result.output and "Traceback" not in result.output
    done = CliRunner().invoke(cli, ["capture", "--model", str(tiny_model_dirs["llama"]), "--corpus",
                                    str(_corpus(tmp_path)), "--out", str(out), "--capture", "hidden,mlp",
                                    "--batch-size", "2", "--device", "cpu", "--shard-tokens", "16", "--resume"])
    assert done.exit_code == 0, done.output
    resumed = ss.open_run(str(out))
    for name in ("hidden", "mlp", "token_id"):
        np.testing.assert_array_equal(resumed.ds[name].values, reference.ds[name].values)


def _corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_interrupted_store_creation_is_ours_to_replace_or_restart(tiny_model_dirs, tmp_path, monkeypatch):
    """Killed while creating the store (after its root group, before its identity): --overwrite
    replaces it and --resume starts it over; neither says it is not a stratascope store."""
    from stratascope.capture import runner

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "write_readout", dies)
    out = tmp_path / "half.zarr"
    with pytest.raises(KeyboardInterrupt):
        ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(out), capture="hidden",
                   progress=False)
    monkeypatch.undo()
    assert out.exists()
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(out), capture="hidden",
                     progress=False, resume=True)
    assert run.attrs["complete"] and run.n_prompts == len(PROMPTS)


def test_ctrl_c_with_workers_is_one_line_and_resumes(tiny_model_dirs, tmp_path):
    """SIGINT to `capture --workers 2` once a shard is done: exit 130, one line on stderr (no
    worker tracebacks, no leaked-semaphore warning), no worker left running, then --resume finishes."""
    import json
    import signal
    import time

    import zarr

    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"The number {i} is followed by the number {i + 1} and"}) + "\n"
                              for i in range(800)))
    out = tmp_path / "w.zarr"
    args = [sys.executable, "-m", "stratascope", "capture", "--model", str(tiny_model_dirs["llama"]), "--corpus",
            str(corpus), "--out", str(out), "--capture", "hidden", "--workers", "2", "--shard-tokens", "64"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if zarr.open_group(str(out), mode="r")["shard_complete"][:].any():
                break
        except Exception:  # not created yet
            pass
        time.sleep(0.5)
    assert proc.poll() is None, "the capture ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and "--resume" in lines[0], err[-3000:]
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ss.open_run(str(out)).n_prompts == 800


def test_disk_full_on_a_real_small_tmpfs(tiny_model_dirs, tmp_path):
    """A real ENOSPC: the capture writes to a small tmpfs that a filler file fills once the store is
    created (the corpus is long enough that the capture is still running then; space gone before
    the start is refused up front instead). One sentence, exit 1; after the filler is removed
    `--resume` completes the store."""
    import errno
    import json
    import os
    import time

    import zarr

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")
    try:
        corpus = tmp_path / "c.jsonl"
        corpus.write_text("".join(json.dumps({"text": f"The number {i} is followed by the number {i + 1} and"})
                                  + "\n" for i in range(3000)))
        out = mount / "r.zarr"
        args = [sys.executable, "-m", "stratascope", "capture", "--model", str(tiny_model_dirs["llama"]), "--corpus",
                str(corpus), "--out", str(out), "--capture", "hidden", "--batch-size", "4", "--shard-tokens", "64",
                "--device", "cpu"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if zarr.open_group(str(out), mode="r").attrs.get("identity"):
                    break
            except Exception:  # not created yet
                pass
            time.sleep(0.2)
        with open(mount / "filler", "wb", buffering=0) as f:  # fill the disk: the next shards cannot fit
            try:
                while True:
                    f.write(b"\0" * 2**20)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-2000:]
        assert "no space left on the disk while writing" in err and "--resume" in err and "Traceback" not in err
        os.remove(mount / "filler")
        resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert ss.open_run(str(out)).n_prompts == 3000
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)



@pytest.mark.parametrize("rows_here", [True, False], ids=["rows-written-by-the-capture", "rows-written-by-the-writer"])
def test_chunks_are_flushed_before_their_shard_is_recorded_complete(tiny_model_dirs, tmp_path, monkeypatch,
                                                                   rows_here):
    """Every chunk file of the capture is flushed to the disk (fdatasync), no temporary file is left,
    and each shard's completion flag is flushed only after all of that shard's chunks: a flag on the
    disk never outlives the rows it vouches for. Both ways of writing: rows written by the capture's
    thread (a CPU model) or by the writer thread (a GPU model)."""
    import os
    import re

    from stratascope.capture import durable, shards, writer

    real_init = writer.ShardWriter.__init__
    monkeypatch.setattr(writer.ShardWriter, "__init__",
                        lambda self, root, **kw: real_init(self, root, **{**kw, "rows_here": rows_here}))

    flushed, real_sync = [], durable._sync
    spans, real_record = {}, shards.record_complete

    def sync(fd):
        real_sync(fd)
        flushed.append(re.sub(r"\.[0-9a-f]{32}\.partial$", "", os.readlink(f"/proc/self/fd/{fd}")))  # the chunk's name

    def record_complete(root, shard):
        spans[shard.index] = (shard.start, shard.stop)
        return real_record(root, shard)

    monkeypatch.setattr(durable, "_sync", sync)
    monkeypatch.setattr(shards, "record_complete", record_complete)
    out = tmp_path / "r.zarr"
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(out), capture="hidden,mlp",
                     batch_size=2, shard_tokens=16, device="cpu", progress=False)
    reference = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(tmp_path / "ref.zarr"),
                           capture="hidden,mlp", batch_size=2, shard_tokens=16, device="cpu", progress=False)
    for name in ("hidden", "mlp", "token_id"):
        np.testing.assert_array_equal(run.ds[name].values, reference.ds[name].values)
    chunks = {str(p) for p in out.rglob("*") if p.is_file() and p.name != "zarr.json"}
    assert chunks and chunks <= set(flushed)
    assert not list(out.rglob("*.partial"))
    order = {key: i for i, key in enumerate(flushed)}
    rows = run.attrs["capture"]["token_chunk"]
    assert len(spans) == run.attrs["capture"]["n_shards"] > 1
    for k, (start, stop) in spans.items():
        flag = order[str(out / "shard_complete" / "c" / str(k))]
        for name in ("hidden", "mlp", "token_id"):
            for c in range(start // rows, -(-stop // rows)):
                chunk = out / name / "c" / str(c)
                key = str(next(p for p in chunk.rglob("*") if p.is_file()) if chunk.is_dir() else chunk)
                assert order[key] < flag, (name, k, c)


@pytest.mark.parametrize("refused", [None, "open", "write"])
def test_chunks_written_directly_are_the_bytes_zarr_writes(tmp_path, monkeypatch, refused):
    """The capture writes whole chunks of uncompressed arrays itself (raw bytes + crc32c) and every
    chunk file with O_DIRECT where the filesystem has it: every file equals the one zarr writes
    through its own LocalStore for the same rows, whether the rows lie on a block boundary (a
    staging buffer) or not, and also where the filesystem refuses O_DIRECT (at the open or the
    write); the edge chunk goes through zarr, and arrays zarr must encode (compressed, sharded)
    are left to zarr."""
    import errno
    import fcntl
    import os

    import zarr

    from stratascope.capture import durable
    from stratascope.capture.buffers import StageBuffers
    from stratascope.capture.shards import Shard, write_rows
    from stratascope.capture.writer import create_array

    rng = np.random.default_rng(0)
    aligned = StageBuffers({"hidden": (0, 4, 512)}, {"hidden": "float16"}, 40).take(40)["hidden"]
    aligned[:] = rng.standard_normal(aligned.shape)  # rows of 4 KiB, from a 4 KiB boundary
    unaligned = np.zeros(40 * 4096 + 8, np.uint8)[8:].view(np.float16).reshape(40, 4, 512)  # 8 bytes off
    unaligned[:] = rng.standard_normal(unaligned.shape)
    stage = {"hidden": aligned, "mlp": unaligned, "attention": rng.random((40, 2, 2, 5)).astype(np.float16)}
    direct_opens, real_open, real_write = [], os.open, os.write

    def spy_open(path, flags, *args, **kwargs):
        if str(path).endswith(".partial") and flags & getattr(os, "O_DIRECT", 0):
            if refused == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            direct_opens.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    def spy_write(fd, data):
        if refused == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "write", spy_write)
    groups = {}
    for name, store in (("zarr", str(tmp_path / "zarr.zarr")),
                        ("direct", durable.StreamingStore(tmp_path / "direct.zarr"))):
        groups[name] = root = zarr.open_group(store, mode="w")
        for array, values in stage.items():
            create_array(root, array, values.shape, 16, "float16")
    for array, values in stage.items():  # the reference: zarr writes every row itself
        groups["zarr"][array][:] = values
    assert durable.write_whole_chunks(groups["direct"]["hidden"], 0, stage["hidden"]) == 32  # 2 of 3 chunks
    assert durable.write_whole_chunks(groups["direct"]["attention"], 0, stage["attention"]) == 0  # lz4: zarr's
    write_rows(groups["direct"], Shard(0, 0, 1, 0, 40), stage)
    for array in stage:
        files = sorted(p.relative_to(tmp_path / "zarr.zarr") for p in (tmp_path / "zarr.zarr" / array).rglob("*")
                       if p.is_file())
        assert len(files) == 4  # zarr.json and three chunks
        for f in files:
            assert (tmp_path / "direct.zarr" / f).read_bytes() == (tmp_path / "zarr.zarr" / f).read_bytes(), f
        np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "direct.zarr"))[array][:], stage[array])
    probe = durable._open_direct(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
    if probe is not None:  # this disk has O_DIRECT
        os.close(probe)
        if refused is None:
            assert len(direct_opens) == 2 + 9  # hidden's two whole chunks, then every chunk of all three arrays
    sharded = zarr.open_group(durable.StreamingStore(tmp_path / "sharded.zarr"), mode="w")
    create_array(sharded, "hidden", stage["hidden"].shape, 8, "float16", shard_rows=16)
    assert durable.write_whole_chunks(sharded["hidden"], 0, stage["hidden"]) == 0

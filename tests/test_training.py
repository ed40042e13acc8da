"""run.torch_dataset: every selected row once per epoch, whatever the DataLoader workers; seeded
order; memory bounded by the buffer. Checked against raw zarr reads and the token table in numpy.
Also the TransformerLens hook names each array records."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

import stratascope as ss
from conftest import PROMPTS
from stratascope.errors import ConfigError, MissingArrayError, OutOfRangeError

CORPUS = [{"text": t, "tags": [f"w{i}" if j % 2 else "" for j in range(len(t.split()))]}
          for i, t in enumerate(PROMPTS * 3)]


@pytest.fixture(scope="module")
def run(tiny_model_dirs, tmp_path_factory):
    # shard_tokens=8: chunks of 8 rows, shards padded with masked filler rows, so there are many
    # chunks and rows that belong to no prompt
    out = tmp_path_factory.mktemp("training") / "run.zarr"
    return ss.capture(model=str(tiny_model_dirs["llama"]), prompts=CORPUS, out=str(out), device="cpu",
                      capture="hidden,mlp,components,qk", batch_size=4, shard_tokens=8, progress=False)


def _raw(run):
    return zarr.open_group(run.path, mode="r", use_consolidated=False)


def _expected_rows(run, positions):
    """The rows `positions` means, from the raw token table in numpy."""
    root = _raw(run)
    offsets, lengths = root["token_offset"][:], root["n_tokens"][:]
    gen = root["is_generated"][:]
    if positions == "all":
        return np.concatenate([np.arange(o, o + n) for o, n in zip(offsets, lengths)])
    if positions == "last":
        return np.array([o + np.flatnonzero(~gen[o:o + n])[-1] for o, n in zip(offsets, lengths)])
    if positions == "0,-1":
        return np.unique(np.concatenate([[o, o + n - 1] for o, n in zip(offsets, lengths)]))
    raise ValueError(positions)


def _collect(ds, workers, batch_size=5):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    values, ids = [], []
    for v, i in loader:
        values.append(v.numpy())
        ids.append(i.numpy())
    return np.concatenate(values), np.concatenate(ids)


@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("name, kw, positions", [("hidden", {"depth": 2}, "all"), ("mlp", {"layer": 1}, "last"),
                                                 ("attn_out", {"layer": 0}, "0,-1")])
def test_every_row_once_per_epoch_with_its_values(run, workers, name, kw, positions):
    ds = run.torch_dataset(name, positions=positions, row_ids=True, buffer_rows=16, seed=3, **kw)
    values, ids = _collect(ds, workers)
    expected = _expected_rows(run, positions)
    assert len(ids) == len(expected) == len(ds)  # no duplicate, no gap
    assert np.array_equal(np.sort(ids), np.sort(expected))
    assert (_raw(run)["prompt_index"][:][ids] >= 0).all()  # never a masked filler row
    raw = _raw(run)[name]
    axis = "depth" if "depth" in kw else "layer"
    index = list(_raw(run)[axis][:]).index(kw[axis])
    np.testing.assert_array_equal(values, raw[:][ids, index])
    assert not np.array_equal(ids, np.sort(ids))  # shuffled


def test_label_positions_use_the_lens_parser(run):
    ds = run.torch_dataset("hidden", depth=0, positions="label:tags", row_ids=True, shuffle=False, buffer_rows=4)
    _, ids = _collect(ds, 0)
    from stratascope.analyze.targets import select_rows

    assert np.array_equal(ids, select_rows(run, "label:tags"))  # unshuffled: ascending
    labels = _raw(run)["label_tags"][:]
    assert len(ids) and np.array_equal(ids, np.flatnonzero([str(v) != "" for v in labels]))


def test_same_seed_same_order_other_seed_or_epoch_another(run):
    def order(seed, epoch=0, workers=0):
        ds = run.torch_dataset("hidden", depth=1, row_ids=True, seed=seed, buffer_rows=16)
        ds.set_epoch(epoch)
        return _collect(ds, workers)[1]

    a = order(0)
    assert np.array_equal(a, order(0))
    assert np.array_equal(order(0, workers=3), order(0, workers=3))
    for other in (order(1), order(0, epoch=1)):
        assert not np.array_equal(a, other) and np.array_equal(np.sort(a), np.sort(other))


def test_buffer_bounds_the_rows_held(run):
    ds = run.torch_dataset("hidden", depth=1, buffer_rows=10, seed=0)
    rows = sum(1 for _ in ds)
    assert rows == len(ds) > 10 * 5
    assert ds.peak_buffer_rows == 10
    # whole depths (no depth=): rows of (depth, d_model), ready batches
    batches = list(run.torch_dataset("hidden", batch_size=7, buffer_rows=10))
    assert all(b.shape[1:] == run.ds.hidden.shape[1:] for b in batches)
    assert [len(b) for b in batches[:-1]] == [7] * (len(batches) - 1) and sum(map(len, batches)) == len(ds)


def test_bad_input_is_one_sentence(run):
    with pytest.raises(MissingArrayError, match="no attention array"):
        run.torch_dataset("attention")
    with pytest.raises(ConfigError, match="not an array with a row"):
        run.torch_dataset("token_offset")
    with pytest.raises(OutOfRangeError, match="depth 9 was not captured"):
        run.torch_dataset("hidden", depth=9)
    with pytest.raises(ConfigError, match="layer= only"):
        run.torch_dataset("hidden", layer=1)
    with pytest.raises(ConfigError, match="--positions"):
        run.torch_dataset("hidden", depth=1, positions="middle")


def test_a_damaged_chunk_is_named(run, tmp_path):
    import shutil

    from stratascope.errors import DamagedStoreError

    copy = tmp_path / "damaged.zarr"
    shutil.copytree(run.path, copy)
    chunk = copy / "hidden" / "c" / "3" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    ds = ss.open_run(str(copy)).torch_dataset("hidden", depth=1)
    with pytest.raises(DamagedStoreError, match="chunk 3/0/0 of array 'hidden' is damaged"):
        for _ in torch.utils.data.DataLoader(ds, batch_size=8, num_workers=1):
            pass


def test_memory_is_bounded_by_the_buffer_not_the_store(tmp_path):
    """A 400 MB store read through a 4,096-row buffer: the peak RSS grows by far less than the store."""
    code = textwrap.dedent(f"""
        import resource, numpy as np, torch, stratascope as ss
        from stratascope.viewer.synthetic import write_large_store
        import zarr
        from stratascope.schemas import VARIABLES
        path = {str(tmp_path / "big.zarr")!r}
        write_large_store(path, n_tokens=131072, prompt_len=64, written_rows=0, n_layers=1, n_heads=1)
        root = zarr.open_group(path, mode="r+", use_consolidated=False)
        spec = VARIABLES["mlp"]
        mlp = root.create_array("mlp", shape=(131072, 1, 768), chunks=(2048, 1, 768), dtype="float32",
                                dimension_names=spec.dims, attributes=spec.attrs())
        rng = np.random.default_rng(0)
        for s in range(0, 131072, 8192):
            mlp[s:s + 8192] = rng.standard_normal((8192, 1, 768), dtype=np.float32)
        root.attrs["capture"] = {{**root.attrs["capture"], "arrays": ["attention", "mlp"]}}
        del mlp, root
        run = ss.open_run(path)
        ds = run.torch_dataset("mlp", layer=0, buffer_rows=4096, seed=0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        total = 0.0
        for batch in torch.utils.data.DataLoader(ds, batch_size=1024):
            total += float(batch[:, 0].sum())
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print("rows", len(ds), "grown_mib", round(grown, 1))
        assert grown < 100, grown  # the store holds 384 MiB of mlp
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout
    print(result.stdout)


# ---------------------------------------------------------------- TransformerLens hook names


def test_hook_names_of_hidden_depths(run):
    n_layers = run.attrs["model"]["n_layers"]
    assert run.hook_name("hidden", 0) == "blocks.0.hook_resid_pre"
    assert run.hook_name("hidden", 1) == "blocks.0.hook_resid_post"
    assert run.hook_name("hidden", n_layers) == f"blocks.{n_layers - 1}.hook_resid_post"
    assert run.hook_name("mlp", 2) == "blocks.2.mlp.hook_post"
    assert run.hook_name("attn_out", 1) == "blocks.1.hook_attn_out"
    assert run.hook_name("mlp_out", 0) == "blocks.0.hook_mlp_out"
    # llama is rotary: the stored queries and keys are after the rotation
    assert run.hook_name("queries", 1) == "blocks.1.attn.hook_rot_q"
    assert run.hook_name("keys", 0) == "blocks.0.attn.hook_rot_k"
    with pytest.raises(OutOfRangeError):
        run.hook_name("hidden", n_layers + 1)
    assert run.hook_name("hidden", depth=2) == "blocks.1.hook_resid_post"
    assert run.hook_name("mlp", layer=0) == "blocks.0.mlp.hook_post"
    with pytest.raises(ConfigError, match="indexed by depth"):
        run.hook_name("hidden", layer=2)
    with pytest.raises(ConfigError, match="indexed by layer"):
        run.hook_name("mlp", 1, layer=1)


def test_capture_writes_the_hook_attrs(tiny_model_dirs, tmp_path):
    """A real capture (tiny GPT-2 and BERT) writes the attrs into the arrays' zarr.json."""
    gpt2 = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "g.zarr"),
                      device="cpu", capture="hidden,attention,mlp,qk,z", progress=False)
    attrs = {n: dict(a.attrs) for n, a in _raw(gpt2).arrays()}
    assert attrs["hidden"]["transformer_lens_hook"] == "blocks.{layer}.hook_resid_post"
    assert attrs["hidden"]["transformer_lens_layer"] == "depth - 1"
    assert attrs["hidden"]["transformer_lens_depth_0"] == "blocks.0.hook_resid_pre"
    assert attrs["attention"]["transformer_lens_hook"] == "blocks.{layer}.attn.hook_pattern"
    assert attrs["queries"]["transformer_lens_hook"] == "blocks.{layer}.attn.hook_q"  # GPT-2: no rotary
    assert attrs["z"]["transformer_lens_hook"] == "blocks.{layer}.attn.hook_z"
    assert attrs["mlp"]["transformer_lens_layer"] == "layer"
    assert "transformer_lens_hook" not in attrs["token_id"]
    assert gpt2.hook_name("attention", 2) == "blocks.2.attn.hook_pattern"
    from click.testing import CliRunner

    from stratascope.cli import cli

    shown = CliRunner().invoke(cli, ["info", gpt2.path]).output
    assert "~ blocks.{layer}.mlp.hook_post" in shown and "depth 0: blocks.0.hook_resid_pre" in shown
    bert = ss.capture(model=str(tiny_model_dirs["bert"]), prompts=PROMPTS[:2], out=str(tmp_path / "b.zarr"),
                      device="cpu", capture="hidden", progress=False)
    assert bert.hook_name("hidden", 3) == "blocks.2.hook_normalized_resid_post"  # post-norm: the block's output
    assert bert.hook_name("hidden", 0) == "blocks.0.hook_resid_pre"


@pytest.mark.real
def test_a_linear_probe_trains_through_a_dataloader_on_smollm2(tmp_path):
    """SmolLM2 hidden states at depth 6 through a 2-worker DataLoader train a linear probe of "the token
    starts with a space" (odd prompts held out); its accuracy matches scikit-learn's on the same rows
    read with zarr."""
    import json
    from pathlib import Path

    from sklearn.linear_model import LogisticRegression

    lines = (Path(ss.__path__[0]) / "data" / "tuned_lens_prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["text"] for line in lines[::2]]  # 80 short prompts, ~1,600 tokens
    run = ss.capture(model="smollm2", prompts=prompts, out=str(tmp_path / "s.zarr"), capture=("hidden",),
                     device="cpu", progress=False, shard_tokens=256)
    assert run.hook_name("hidden", 6) == "blocks.5.hook_resid_post"
    root = _raw(run)
    assert root["hidden"].attrs["transformer_lens_hook"] == "blocks.{layer}.hook_resid_post"
    space = np.array([str(t).startswith(" ") for t in root["token_str"][:]])
    held_out = np.isin(root["prompt_index"][:], np.arange(1, len(prompts), 2))
    ds = run.torch_dataset("hidden", depth=6, row_ids=True, buffer_rows=1024, seed=0)

    def training_batches(batch_size):
        for x, rows in torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=2):
            keep = ~held_out[rows.numpy()]
            yield x[torch.from_numpy(keep)], torch.from_numpy(space[rows.numpy()][keep]).float()

    n, s1, s2 = 0, 0.0, 0.0  # standardize with the training rows' mean and std (one pass)
    for x, _ in training_batches(256):
        x = x.double()
        n, s1, s2 = n + len(x), s1 + x.sum(0), s2 + (x * x).sum(0)
    mean, std = (s1 / n).float(), (s2 / n - (s1 / n) ** 2).clamp_min(1e-6).sqrt().float()
    torch.manual_seed(0)
    probe = torch.nn.Linear(576, 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for epoch in range(10):
        ds.set_epoch(epoch)
        for x, y in training_batches(64):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe((x - mean) / std).squeeze(1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    hidden = root["hidden"][:][:, list(root["depth"][:]).index(6)]
    rows = np.concatenate([np.arange(o, o + k) for o, k in zip(root["token_offset"][:], root["n_tokens"][:])])
    train, test = rows[~held_out[rows]], rows[held_out[rows]]
    assert n == len(train)

    def features(r):
        return (hidden[r] - mean.numpy()) / std.numpy()

    with torch.no_grad():
        ours = ((probe(torch.from_numpy(features(test))).squeeze(1) > 0).numpy() == space[test]).mean()
    sk = LogisticRegression(max_iter=5000).fit(features(train), space[train]).score(features(test), space[test])
    majority = max(space[test].mean(), 1 - space[test].mean())
    assert ours > majority + 0.15, (ours, majority)
    assert abs(ours - sk) < 0.04, (ours, sk)

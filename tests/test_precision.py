"""Model precision (--model-dtype), placement (--device-map), GGUF files as --model, and what the
resume identity holds so shards computed differently never mix; each checked against transformers
itself or against a plain load."""

import json
import re

import numpy as np
import pytest
import torch

import stratascope as ss
from conftest import PROMPTS
from stratascope.capture.config import CaptureConfig
from stratascope.errors import ConfigError, ModelNotFoundError, ResumeMismatchError

CORPUS = [f"{p} number {i}" for i in range(3) for p in PROMPTS]  # 18 prompts
OPTS = dict(progress=False, shard_tokens=64, batch_size=4)


def _reference_hidden(path, dtype, prompts):
    """Per prompt, every depth of the un-normalized residual stream from a direct transformers forward:
    hidden_states[d] for d < L, and the last block's output (HF's last entry is already normalized)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    last = {}
    model.model.layers[-1].register_forward_hook(lambda m, a, out: last.update(h=out[0] if isinstance(out, tuple)
                                                                                else out))
    rows = []
    with torch.no_grad():
        for text in prompts:
            ids = torch.tensor([tok(text)["input_ids"]])
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            depths = list(out.hidden_states[:-1]) + [last["h"]]
            rows.append(torch.stack([h[0] for h in depths], dim=1).float().numpy())
    return np.concatenate(rows)


def _rows(run):
    return run.ds.hidden.values[run.ds.prompt_index.values >= 0]


def test_bfloat16_hidden_equals_a_bfloat16_transformers_forward(tiny_model_dirs, tmp_path):
    path = tiny_model_dirs["llama"]
    run = ss.capture(model=str(path), prompts=PROMPTS, out=str(tmp_path / "bf16.zarr"), capture="hidden",
                     model_dtype="bfloat16", batch_size=1, device="cpu", progress=False)
    assert run.attrs["model"]["dtype"] == "bfloat16" and run.attrs["capture"]["model_dtype"] == "bfloat16"
    assert run.attrs["capture"]["dtype"] == "float32"  # the storage dtype stays what --dtype says
    got = _rows(run)
    np.testing.assert_array_equal(got, _reference_hidden(path, torch.bfloat16, PROMPTS))
    # and it really ran in bfloat16: float32 values differ, and bfloat16 values are exact in 8 mantissa bits
    np.testing.assert_allclose(got, _reference_hidden(path, torch.float32, PROMPTS), rtol=0.05, atol=0.05)
    assert not np.array_equal(got, _reference_hidden(path, torch.float32, PROMPTS))
    assert (got.view(np.uint32) & 0xFFFF == 0).all()


def test_model_dtype_defaults_to_float32_on_the_cpu(tiny_model_dirs, tmp_path):
    run = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "a.zarr"),
                     capture="hidden", device="cpu", progress=False)
    assert run.attrs["model"]["dtype"] == "float32" and run.attrs["capture"]["model_dtype"] == "float32"
    assert run.attrs["identity"]["numerics"] == {"device": "cpu", "torch": torch.__version__}


def test_half_precision_gradients_are_refused(tiny_model_dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"--capture attribution/grad is computed in float32 only.*bfloat16"):
        ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS[:2], out=str(tmp_path / "g.zarr"),
                   capture="hidden,attribution", model_dtype="bfloat16", device="cpu", progress=False)
    assert not (tmp_path / "g.zarr").exists()


def _explicit_map(n_layers: int) -> str:
    """Every module of the tiny Llama named, each block on the CPU: the form a user writes by hand."""
    placed = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placed |= {f"model.layers.{i}": "cpu" for i in range(n_layers)}
    return json.dumps(placed)


def test_device_map_stores_what_the_plain_load_stores(tiny_model_dirs, tmp_path):
    path = str(tiny_model_dirs["llama"])
    arrays = ("hidden", "attention", "mlp", "token_id")
    plain = ss.capture(model=path, prompts=CORPUS, out=str(tmp_path / "plain.zarr"), device="cpu", **OPTS)
    for i, placement in enumerate([dict(device_map="auto"), dict(device_map="balanced", max_memory="cpu=1GiB"),
                                   dict(device_map=_explicit_map(3))]):
        run = ss.capture(model=path, prompts=CORPUS, out=str(tmp_path / f"m{i}.zarr"), **placement, **OPTS)
        for name in arrays:
            assert np.array_equal(run.ds[name].values, plain.ds[name].values), (placement, name)
        placed = run.attrs["model"]["device_map"]
        assert placed and set(placed.values()) == {"cpu"}, placed
    assert run.attrs["model"]["device_map"]["model.layers.2"] == "cpu"  # the map as given, module by module


def test_a_worker_places_its_own_copy_with_the_device_map(tiny_model_dirs, tmp_path):
    path = str(tiny_model_dirs["llama"])
    plain = ss.capture(model=path, prompts=CORPUS, out=str(tmp_path / "plain.zarr"), device="cpu", threads=1, **OPTS)
    run = ss.capture(model=path, prompts=CORPUS, out=str(tmp_path / "w.zarr"), workers=1, device_map="auto",
                     max_memory="cpu=60KB", **OPTS)  # offloaded to disk in the worker
    assert run.attrs["model"]["device_map"] == "auto"  # each worker applies the strategy itself
    for name in ("hidden", "attention", "mlp", "token_id"):
        assert np.array_equal(run.ds[name].values, plain.ds[name].values), name


@pytest.mark.parametrize("where", ["max_memory", "explicit"])
def test_weights_offloaded_to_disk_store_what_the_plain_load_stores(tiny_model_dirs, tmp_path, where):
    """accelerate keeps offloaded weights on disk and brings each module in for its forward; the
    readout, the weights hash and every array come out as from a plain load."""
    path = str(tiny_model_dirs["llama"])
    opts = dict(capture="hidden,attention,mlp,components", **OPTS)
    plain = ss.capture(model=path, prompts=CORPUS, out=str(tmp_path / "plain.zarr"), device="cpu", **opts)
    if where == "max_memory":  # room for about one block in RAM: the rest goes to disk
        placement = dict(device_map="auto", max_memory="cpu=60KB")
    else:
        placed = json.loads(_explicit_map(3)) | {"model.layers.1": "disk", "lm_head": "disk", "model.norm": "disk"}
        placement = dict(device_map=json.dumps(placed))
    run = ss.capture(model=path, prompts=CORPUS, out=str(tmp_path / "disk.zarr"), **placement, **opts)
    assert "disk" in run.attrs["model"]["device_map"].values()
    assert run.attrs["model"]["weights_sha256"] == plain.attrs["model"]["weights_sha256"]
    for name in ("hidden", "attention", "mlp", "attn_out", "mlp_out", "token_id"):
        assert np.array_equal(run.ds[name].values, plain.ds[name].values), name
    for name in ("unembed", "norm_weight", "attn_out_weight", "mlp_out_weight"):
        assert np.array_equal(run.readout[name].values, plain.readout[name].values), name


def test_impossible_combinations_are_refused():
    for options, said in ((dict(device="cuda:1", device_map="auto"), "--device-map places the model's blocks "
                                                                     "itself, so --device cuda:1 cannot apply"),
                          (dict(device="cpu", device_map="auto"), "--device cpu cannot apply"),
                          (dict(max_memory="cpu=1GiB"), "--max-memory only applies with --device-map"),
                          (dict(device_map="everywhere"), "--device-map 'everywhere' is not a placement"),
                          (dict(device_map="{not json"), "is not a JSON object"),
                          (dict(device_map="auto", max_memory="cpu:1GiB"), "is not DEVICE=AMOUNT"),
                          (dict(model_dtype="int8"), "--model-dtype 'int8' is not supported")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            CaptureConfig(**options)


def test_each_local_worker_owns_its_gpus():
    from stratascope.worker_setup import gpu_slices

    assert gpu_slices([str(i) for i in range(8)], 2) == ["0,1,2,3", "4,5,6,7"]
    assert gpu_slices(["0", "1", "2"], 2) == ["0", "1"]  # whole equal slices; the third stays unused
    assert gpu_slices(["4", "6"], 3) == ["4", "6", "4"]  # more workers than GPUs: one each, shared
    assert gpu_slices([], 2) == ["", ""]


def test_resume_refuses_shards_computed_differently(tiny_model_dirs, tmp_path, monkeypatch):
    """Threads, model dtype, device map and the torch version each decide the last bits: a resume
    with any of them changed names it and changes nothing."""
    import shutil

    path = str(tiny_model_dirs["llama"])
    base = dict(device="cpu", capture="hidden", **OPTS)
    out = tmp_path / "t2.zarr"
    ss.capture(model=path, prompts=CORPUS, out=str(out), threads=2, **base)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for changed, said in ((dict(threads=1), "--threads was 2, now 1"),
                          (dict(threads=2, model_dtype="bfloat16"), "--model-dtype was 'float32', now 'bfloat16'"),
                          (dict(threads=2, device="auto", device_map="auto"), "--device-map was None, now 'auto'"),
                          (dict(workers=1), "--threads was 2, now 1")):  # a LocalCluster worker runs 1 thread
        with pytest.raises(ResumeMismatchError, match=re.escape(said)):
            ss.capture(model=path, prompts=CORPUS, out=str(out), resume=True, **{**base, **changed})
    real = torch.__version__
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    with pytest.raises(ResumeMismatchError, match=re.escape(f"torch was {real}, now 9.9.9")):
        ss.capture(model=path, prompts=CORPUS, out=str(out), resume=True, threads=2, **base)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    copy = tmp_path / "copy.zarr"
    shutil.copytree(out, copy)
    done = ss.capture(model=path, prompts=CORPUS, out=str(copy), resume=True, threads=2, **base)
    assert done.attrs["complete"]


@pytest.mark.real
def test_one_thread_in_process_equals_two_workers_on_smollm2(tmp_path):
    """The determinism statement on the real model: the same thread count gives the same bits
    in-process and on 2 LocalCluster workers (which run 1 thread each)."""
    corpus = [f"{p} number {i}" for i in range(4) for p in PROMPTS]
    opts = dict(capture="hidden,attention,mlp", device="cpu", progress=False, shard_tokens=128)
    one = ss.capture(model="smollm2", prompts=corpus, out=str(tmp_path / "one.zarr"), threads=1, **opts)
    two = ss.capture(model="smollm2", prompts=corpus, out=str(tmp_path / "two.zarr"), workers=2, **opts)
    assert one.attrs["identity"] == two.attrs["identity"]
    for name in ("hidden", "attention", "mlp", "token_id"):
        assert np.array_equal(one.ds[name].values, two.ds[name].values), name


@pytest.mark.real
def test_a_gguf_file_as_model_equals_transformers_reading_it(tmp_path):
    import transformers as tf

    from stratascope.models import BUNDLED

    gguf = BUNDLED["smollm2"].path()
    if gguf is None:
        pytest.skip("the bundled SmolLM2 package is not installed")
    prompts = PROMPTS[:3]
    run = ss.capture(model=str(gguf), prompts=prompts, out=str(tmp_path / "g.zarr"), capture="hidden",
                     batch_size=1, device="cpu", progress=False)
    assert run.attrs["model"]["source"] == str(gguf.resolve())
    model = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    got = _rows(run)
    o = 0
    with torch.no_grad():
        for text in prompts:
            ids = torch.tensor([tok(text)["input_ids"]])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            n = ids.shape[1]
            want = torch.stack([h[0] for h in hs[:-1]], dim=1).numpy()  # depths 0..L-1
            np.testing.assert_allclose(got[o:o + n, :-1], want, rtol=1e-5, atol=1e-5)
            o += n


def test_a_gguf_path_that_is_missing_or_unreadable_is_one_sentence(tmp_path):
    from stratascope.models import load_model

    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        load_model(str(tmp_path / "absent.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelNotFoundError, match="is a GGUF file transformers cannot read here"):
        load_model(str(bad))


def test_a_scheduler_capture_runs_every_shard_at_its_workers_fewest_threads():
    from distributed import LocalCluster

    from stratascope.capture.numerics import default_threads

    with LocalCluster(n_workers=2, threads_per_worker=3, processes=False, dashboard_address=None) as cluster:
        assert default_threads(None, cluster.scheduler_address) == 3
    assert default_threads(2, None) == 1 and default_threads(None, None) == torch.get_num_threads()

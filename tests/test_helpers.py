"""The one device resolver, range parser and cache helper, and that every layer uses them alike."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import stratascope as ss
from conftest import PROMPTS
from stratascope.caching import LRU
from stratascope.devices import resolve_device
from stratascope.errors import ConfigError, DeviceError, OutOfRangeError
from stratascope.ranges import parse_ranges


@pytest.fixture(scope="module")
def run(tiny_model_dirs, tmp_path_factory):
    return ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS,
                      out=str(tmp_path_factory.mktemp("h") / "r.zarr"), capture="hidden,mlp", device="cpu",
                      progress=False)


def test_resolve_device_names():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(" cpu ") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "mps:0", "cpu:1", ""):
        with pytest.raises(ConfigError, match=r"--device .* is not a device name; use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(ConfigError, match="^--lens-device 'tpu'"):
        resolve_device("tpu", option="--lens-device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_every_layer_refuses_a_missing_gpu_with_the_same_sentence(run, tiny_model_dirs):
    """Model loading, the lens, NMF and the probes all go through the one resolver."""
    from stratascope.models import load_model

    sentence = "--device cuda was asked for, but this machine has no CUDA device; use --device cpu"
    calls = [lambda: load_model(str(tiny_model_dirs["llama"]), device="cuda"),
             lambda: run.lens(topk=2, device="cuda", progress=False),
             lambda: run.nmf(factors=2, device="cuda")]
    for call in calls:
        with pytest.raises(DeviceError) as e:
            call()
        assert str(e.value) == sentence


def test_parse_ranges_orders_and_bounds():
    assert parse_ranges("5,0-2,1", 10, "layers") == [0, 1, 2, 5]
    assert parse_ranges("5,0-2,1", 10, "layers", keep_order=True) == [5, 0, 1, 2]
    assert parse_ranges(np.int64(3), 10, "layers") == [3]
    assert parse_ranges("-1,40", None, "depths", keep_order=True) == [-1, 40]
    assert parse_ranges(" ", 10, "layers") is None
    with pytest.raises(ConfigError, match="runs backwards; write 2-5"):
        parse_ranges("5-2", 10, "layers")
    with pytest.raises(ConfigError, match="-1 is out of range; this model has depths 0-9"):
        parse_ranges("-1,40", 10, "depths")


def test_lens_depths_through_parse_ranges(run):
    """Order kept, negatives from the end, and the run's own depths as the bound."""
    from stratascope.analyze.lens import parse_depths

    have = [int(d) for d in run.ds["depth"].values]
    assert parse_depths(run, None) == have
    assert parse_depths(run, "2,0-1") == [2, 0, 1]
    assert parse_depths(run, [-1, have[-1], 0]) == [have[-1], 0]
    assert parse_depths(run, np.int64(1)) == [1]
    last = have[-1]
    with pytest.raises(OutOfRangeError, match=f"depth {last + 1} is out of range; this run holds depths 0-{last}"):
        parse_depths(run, "0-9")
    with pytest.raises(ConfigError, match="'x' is not a number or a range"):
        parse_depths(run, "x")
    with pytest.raises(ConfigError, match="selects no depth"):
        parse_depths(run, [])


def test_lru_keeps_the_most_recent():
    made = []
    cache = LRU(2)
    get = lambda k: cache.get(k, lambda: made.append(k) or k * 10)  # noqa: E731
    assert [get(1), get(2), get(1), get(3), get(1), get(2)] == [10, 20, 10, 30, 10, 20]
    assert made == [1, 2, 3, 2]  # 2 was the least recently used when 3 came
    assert len(cache) == 2 and 1 in cache and 3 not in cache
    with pytest.raises(ValueError):
        LRU(0)


def test_lru_under_threads():
    """Many threads reading and filling one small cache: every answer right, never over its size."""
    cache, sizes, errors = LRU(8), [], []
    barrier = threading.Barrier(8)

    def work(seed):
        rng = np.random.default_rng(seed)
        barrier.wait()
        try:
            for k in rng.integers(0, 40, 3000):
                assert cache.get(int(k), lambda k=int(k): ("v", k)) == ("v", int(k))
                sizes.append(len(cache))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and max(sizes) <= 8


def test_viewer_slices_from_many_threads(run):
    """The app's request threads share one Run's slice caches: answers equal a fresh single-threaded Run's."""
    from stratascope.viewer import data

    fresh = ss.open_run(run.path)
    expected = {p: data.tokens(fresh, p) for p in range(len(PROMPTS))}
    shared = ss.open_run(run.path)
    asks = [p for _ in range(30) for p in range(len(PROMPTS))]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: (p, data.tokens(shared, p)), asks))
    for p, answer in answers:
        assert answer == expected[p]

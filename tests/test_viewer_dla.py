"""The logit attribution view in headless chromium, in the report and the app: bars against the stored
analysis/dla read with zarr directly, the position picker, no console errors, a screenshot."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from test_viewer_browser import Viewer, _trace, browser

import stratascope as ss
from stratascope.cli import cli

pytestmark = pytest.mark.browser
PROMPTS = ["The nurse said that she was tired", "<img src=x onerror=\"window.__pwned=1\"> the keys"]


@pytest.fixture(scope="module")
def dla_store(tiny_model_dirs, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("viewer-dla") / "dla.zarr")
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=path, device="cpu",
                     capture="hidden,components,z", progress=False)
    run.dla(target="next", contrast=" the", positions="all", progress=False)
    return path


@pytest.fixture(params=["report", "app"])
def dla_target(request, dla_store, tmp_path_factory):
    if request.param == "report":
        out = tmp_path_factory.mktemp("report") / "dla.html"
        res = CliRunner().invoke(cli, ["report", dla_store, "-o", str(out), "--views", "dla"])
        assert res.exit_code == 0, res.output
        yield "report", out.as_uri()
        return
    from stratascope.viewer.app import serve_in_thread

    server, url = serve_in_thread(ss.open_run(dla_store))
    yield "app", url
    server.shutdown()
    server.server_close()


def test_dla_view(browser, dla_target, dla_store):
    (name,) = zarr.open_group(dla_store, mode="r", path="analysis/dla").group_keys()  # the one dla result
    g = zarr.open_group(dla_store, mode="r", path=f"analysis/dla/{name}")
    comp, prompt, position = g["by_component"][:], g["prompt"][:], g["position"][:]
    names = [str(c) for c in g["component"][:]]
    logit = g["logit"][:]

    def bars(p: int, pos: int):
        row = np.flatnonzero((prompt == p) & (position == pos))[0]
        want = dict(zip(names, comp[row]))
        np.testing.assert_allclose(_trace(v, ".ss-dla-plot", "attn"), [want[f"attn.{l}"] for l in range(3)], atol=1e-4)
        np.testing.assert_allclose(_trace(v, ".ss-dla-plot", "mlp"), [want[f"mlp.{l}"] for l in range(3)], atol=1e-4)
        np.testing.assert_allclose(_trace(v, ".ss-dla-plot", "embed"), [want["embed"]], atol=1e-4)
        title = v.page.evaluate("() => document.querySelector('.ss-dla-plot').layout.title.text")
        assert f"position {pos}:" in title and f"logit {logit[row]:+.2f}" in title

    v = Viewer(browser, dla_target, "dla", prompt=0)
    last = int(position[prompt == 0].max())
    bars(0, last)  # the last row of the prompt by default
    assert v.count(".ss-position option") == int((prompt == 0).sum())
    assert "the contributions sum to" in v.page.inner_text(".ss-dla-facts")
    v.shot("dla")
    v.choose(".ss-position", 2)
    bars(0, 2)
    v.done()
    v = Viewer(browser, dla_target, "dla", prompt=1)  # a prompt whose text is markup: shown as text
    bars(1, int(position[prompt == 1].max()))
    v.done("dla_prompt1")

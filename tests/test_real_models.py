"""The bundled real models, end to end through the API and the CLI."""

import numpy as np
import pytest
from click.testing import CliRunner

import stratascope as ss
from stratascope.cli import cli

pytestmark = pytest.mark.real


def _readout_logits(run, h):
    """Final RMSNorm and unembedding by hand in numpy, from the stored readout only."""
    r = run.readout
    x = h.astype(np.float64)
    x = x / np.sqrt((x**2).mean() + r.attrs["norm_eps"]) * r.norm_weight.values
    return r.unembed.values.astype(np.float64) @ x


def test_smollm2_heathrow_london(tmp_path):
    import torch

    from stratascope.models import load_model

    text = "Heathrow airport is located in the city of"
    run = ss.capture(model="smollm2", prompts=[text], out=str(tmp_path / "h.zarr"), capture=["hidden"],
                     progress=False)
    h = run.ds.hidden.isel(token=run.token_slice(0)).values[-1, -1]
    logits = _readout_logits(run, h)
    vocab = run.readout.vocab_str.values
    assert vocab[int(np.argmax(logits))] == " London"
    loaded = load_model("smollm2", device="cpu")
    ids = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        real = loaded.model(**ids).logits[0, -1].numpy()
    assert int(np.argmax(real)) == int(np.argmax(logits))
    np.testing.assert_allclose(logits, real, atol=2e-3, rtol=1e-3)


def test_smollm2_cli_capture_info(tmp_path):
    corpus = tmp_path / "p.txt"
    corpus.write_text("The keys to the cabinet\n1, 1, 1,\n")
    out = tmp_path / "r.zarr"
    r = CliRunner().invoke(cli, ["capture", "--model", "smollm2", "--corpus", str(corpus), "--out", str(out),
                                 "--capture", "hidden,attention,mlp", "--layers", "0-5", "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["info", str(out)])
    assert r.exit_code == 0 and "smollm2" in r.output and "30 layers" in r.output and "float16" in r.output
    run = ss.open_run(out)
    assert run.ds.attention.shape[1:3] == (6, 9) and run.ds.mlp.shape[1:] == (6, 1536)
    att = run.ds.attention.values.astype(np.float32)
    rows = att.sum(-1)  # each query's weights sum to one over its keys
    np.testing.assert_allclose(rows, 1.0, atol=1e-2)


def test_minilm_encoder_capture(tmp_path):
    run = ss.capture(model="minilm", prompts=["The keys to the cabinet", "A dog"], out=str(tmp_path / "m.zarr"),
                     progress=False)
    assert run.attrs["model"]["family"] == "bert" and run.attrs["model"]["causal"] is False
    assert run.ds.hidden.shape[1:] == (7, 384)
    assert run.readout.attrs["lens"] is False
    tokens = run.tokens(0)
    assert tokens.token.iloc[0] == "[CLS]" and tokens.token.iloc[-1] == "[SEP]"

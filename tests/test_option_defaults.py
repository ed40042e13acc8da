"""One default per option: each command's click options agree with the Python API it calls.

For every (command, function) pair, every option the command shares by name with the
function's signature has the same default in both.
"""

from __future__ import annotations

import inspect

import pytest

import stratascope as ss
from stratascope.analyze import dla, heads, lens, nmf, probe, similarity
from stratascope.analyze.bias import bias
from stratascope.capture import runner
from stratascope.capture.config import CaptureConfig
from stratascope.cli import cli
from stratascope.options import defaults
from stratascope.run import Run
from stratascope.viewer.report import build_report
from stratascope.workflows import bias_probe

PAIRS = [
    ("capture", ss.capture), ("capture", runner.capture),
    ("lens", Run.lens), ("lens", lens.run_lens),
    ("nmf", Run.nmf), ("nmf", nmf.nmf),
    ("heads", Run.heads), ("heads", heads.summarize_heads),
    ("probe bias", ss.bias_probe), ("probe bias", bias_probe.bias_probe), ("probe bias", Run.bias),
    ("probe bias", bias),
    ("probe linear", Run.linear_probe), ("probe linear", probe.linear_probe),
    ("report", build_report),
    ("tuned-lens train", Run.tuned_lens),
    ("similarity", Run.similarity), ("similarity", similarity.similarity),
    ("dla", Run.dla), ("dla", dla.dla),
]


def _command(path: str):
    cmd = cli
    for part in path.split():
        cmd = cmd.commands[part]
    return cmd


# CLI options whose None means "not given", so that a conflict with another option can be named;
# the function's own default then applies.
NOT_GIVEN = {("probe bias", "model"), ("probe bias", "out"), ("probe bias", "corpus")}


def _cli_default(param):
    """What the command passes when the option is not given (click marks that as UNSET)."""
    if type(param.default).__name__ != "Sentinel":
        return param.default
    return False if getattr(param, "is_flag", False) else None


def _same(value):
    """Defaults as a user means them: no value (None, empty) alike; a tuple as its comma form."""
    if value in (None, (), []):
        return None
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return value


@pytest.mark.parametrize("command,fn", PAIRS, ids=[f"{c}-{f.__module__}.{f.__qualname__}" for c, f in PAIRS])
def test_cli_and_api_defaults_agree(command, fn):
    params = inspect.signature(fn).parameters
    shared = [p for p in _command(command).params if p.name in params and not p.required
              and (command, p.name) not in NOT_GIVEN and params[p.name].default is not inspect.Parameter.empty]
    assert shared, f"{command} shares no option with {fn.__qualname__}"
    differ = {p.name: (_cli_default(p), params[p.name].default) for p in shared
              if _same(_cli_default(p)) != _same(params[p.name].default)}
    assert not differ, f"defaults differ between `stratascope {command}` and {fn.__qualname__}: {differ}"


def test_capture_options_come_from_one_definition():
    cmd = _command("capture")
    cli_options = {p.name for p in cmd.params}
    assert set(defaults(CaptureConfig)) <= cli_options
    for fn in (ss.capture, runner.capture):
        assert set(defaults(CaptureConfig)) <= set(inspect.signature(fn).parameters)
        assert "batch_size" in fn.__doc__

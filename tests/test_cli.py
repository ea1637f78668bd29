"""Every pipeline answers `--help`: argparse %-formats help strings, so one stray `%`
in a dataclass field's help breaks the whole command's help."""

import runpy
import sys
from pathlib import Path

import pytest

PIPELINES = sorted((Path(__file__).parents[1] / "pipelines").glob("*.py"))


@pytest.mark.parametrize("script", PIPELINES, ids=lambda p: p.name)
def test_every_pipeline_prints_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_parse(config):
    from cached_mslt.config import MethodArgs, parse_args
    from cached_mslt.evaluation import FinetuneArgs

    args, (method, _) = parse_args(["--config", str(config)], extra=(MethodArgs, FinetuneArgs))
    assert args.model.preset and method.methods
    assert all(isinstance(lr, float) for lr in method.learning_rates)  # YAML 5e-4 is a string

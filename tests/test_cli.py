"""`ksg`: options and key=value overrides in any order, `--version`, and every config key shown with its default."""

from __future__ import annotations

import pytest

from ksg_ray import cli
from ksg_ray.common.config import job_config
from ksg_ray.server.synth.config import SynthConfig


def test_serve_takes_overrides_after_its_options(smollm2_path):
    from ksg_ray.serve.launch import app_config_from_args

    _, commands = cli.build_parser()
    args = commands["serve"].parse_intermixed_args(
        ["smollm2-135m", "--host", "127.0.0.1", "--port", "8001", "auth.token_env=KSG_TOKEN", "--name", "m"])
    assert (args.model_dir, args.host, args.port, args.name) == ("smollm2-135m", "127.0.0.1", 8001, "m")
    assert args.overrides == ["auth.token_env=KSG_TOKEN"]
    assert app_config_from_args(args).auth.token_env == "KSG_TOKEN"


def test_a_stage_takes_its_config_and_overrides_in_any_order(capsys):
    assert cli.main(["config", "show", "synthesize", "queries.per_prompt=3", "configs/synthesize.yaml",
                     "seed=7"]) == 0
    shown = capsys.readouterr().out
    assert "per_prompt: 3" in shown and "seed: 7" in shown
    assert "mode: sample" in shown  # from the YAML, not the class default
    assert "# PUBLIC server-side sampling seed" in shown  # every key with its description
    cfg = job_config(SynthConfig, ["queries.per_prompt=3", "--config", "configs/synthesize.yaml", "seed=7"], "t")
    assert (cfg.queries.per_prompt, cfg.seed, cfg.queries.mode) == (3, 7, "sample")
    with pytest.raises(SystemExit):
        cli.main(["config", "show", "synthesize", "a.yaml", "b.yaml"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("ksg-ray ")

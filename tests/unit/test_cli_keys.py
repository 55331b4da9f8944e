"""The ignored-key walk: every command either honours a `--set` key of the sections it reads or refuses it
before anything starts, naming the key and why. Walks every leaf key of the config through every command's
real entry point for the keys it leaves unused, and checks the keys a user would expect to matter."""

from __future__ import annotations

import json

import pytest

from apr_ray import plain
from apr_ray.cli import main
from apr_ray.config import UNUSED_BY_COMMAND, RunConfig, unused_reason


def leaf_keys(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= leaf_keys(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


DEFAULTS = leaf_keys(RunConfig().model_dump(mode="json"))


def as_yaml(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return json.dumps(value)  # JSON is YAML, and writes None as null
    return str(value)


def argv(command: str, tmp_path) -> list[str]:
    """The command's own arguments, pointing at places that would show if it ran at all."""
    return {
        "sft": ["sft"], "grpo": ["grpo"], "eval": ["eval"], "run": ["run"], "config show": ["config", "show"],
        "data problems": ["data", "problems", "--out", str(tmp_path / "out")],
        "data demos": ["data", "demos", "--problems", str(tmp_path / "problems"), "--out", str(tmp_path / "out")],
        "data import-apr": ["data", "import-apr", str(tmp_path / "ref.json"), "--out", str(tmp_path / "out")],
    }[command]


def call(command: str, sets: list[str], tmp_path) -> int:
    args = [a for item in sets for a in ("--set", item)]
    if command == "plain":
        return plain.main(args)
    return main(argv(command, tmp_path) + args)


@pytest.mark.parametrize("command", sorted(UNUSED_BY_COMMAND))
def test_every_key_a_command_leaves_unused_is_refused_by_it(command, tmp_path, capsys):
    out = tmp_path / "run"
    unused = [key for key in DEFAULTS if unused_reason(command, key) is not None]
    for key in unused:
        item = f"{key}={as_yaml(DEFAULTS[key])}"
        assert call(command, [item, f"output_dir={out}"] if unused_reason(command, "output_dir") is None else [item],
                    tmp_path) == 2, (command, key)
        err = capsys.readouterr().err
        assert f"does not use {key}" in err, (command, key, err)
    assert not out.exists() and not (tmp_path / "out").exists()  # refused before anything was written


# Keys a user would set on these commands and expect to matter: the silent ignores and their kin.
EXPECTED_UNUSED = {
    "sft": ["grpo.steps", "grpo.learner.lr", "rollout.runtime.sampling.temperature"],
    "grpo": ["sft.steps", "sft.learner.lr"],
    "eval": ["sft.steps", "grpo.steps", "learners.num_learners", "rollout.runtime.sampling.temperature"],
    "plain": ["grpo.steps", "tracking.enabled", "learners.num_learners", "rollout.backend", "rollout.pool.num_workers",
              "rollout.engine.kv_cache_memory_bytes", "data.num_workers", "rollout.runtime.sampling.temperature"],
    "data problems": ["output_dir", "data.demos.kind", "sft.steps"],
    "data demos": ["output_dir", "data.train_problems", "seed"],
    "data import-apr": ["output_dir", "data.demos.kind", "data.demos.solver.apr_max_beam"],
}
EXPECTED_USED = {
    "sft": ["sft.steps", "eval.split", "eval.sampling.temperature", "rollout.runtime.max_tokens", "model.num_layers",
            "data.train_problems", "learners.num_learners", "tracking.enabled"],
    "grpo": ["grpo.steps", "eval.split", "rollout.runtime.sampling.temperature", "data.val_problems",
             "model.hidden_size"],  # model.*: only when GRPO starts from a model built here (see below)
    "eval": ["eval.split", "eval.problems", "eval.sampling.temperature", "rollout.backend", "data.test_problems"],
    "plain": ["sft.steps", "eval.split", "eval.problems", "rollout.engine.max_num_seqs",
              "rollout.pool.max_concurrent_trees", "rollout.runtime.max_tokens", "model.num_layers"],
    "data problems": ["seed", "data.problems.num_max", "data.val_problems", "data.num_workers"],
    "data demos": ["data.demos.solver.expand_order", "data.demos.only_solved", "data.num_workers"],
    "data import-apr": ["data.demos.format.condition"],
}


@pytest.mark.parametrize("command", sorted(EXPECTED_UNUSED))
def test_the_keys_users_would_expect_to_matter_are_used_or_refused(command):
    for key in EXPECTED_UNUSED[command]:
        assert key in DEFAULTS, key
        assert unused_reason(command, key), (command, key)
    for key in EXPECTED_USED[command]:
        assert key in DEFAULTS, key
        assert unused_reason(command, key) is None, (command, key)


@pytest.mark.parametrize("command", ["grpo", "eval"])
def test_model_settings_are_refused_when_the_command_starts_from_a_model_directory(command, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "run"
    assert main([command, "--model", str(model), "--set", f"output_dir={out}", "--set", "model.num_layers=2"]) == 2
    err = capsys.readouterr().err
    assert "does not use model.num_layers" in err and str(model) in err
    assert not out.exists()


def test_plain_refuses_model_settings_with_a_model_directory(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "run"
    assert plain.main(["--model", str(model), "--set", f"output_dir={out}", "--set", "model.hidden_size=256"]) == 2
    assert "does not use model.hidden_size" in capsys.readouterr().err
    assert not out.exists()

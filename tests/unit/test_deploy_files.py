"""The deployment files agree with routerd: settings they name exist, the
Kubernetes templates are the repository's, the image's health check asks the
right address. (tests/e2e runs the container pair itself.)"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from routerd.router.commands import run
from routerd.settings import env_name

REPO = Path(__file__).resolve().parents[2]
DEPLOY_FILES = [
    REPO / "Dockerfile",
    REPO / "deploy" / "compose.yaml",
    REPO / "tests" / "e2e" / "compose.yaml",
    *sorted((REPO / "deploy" / "kubernetes").glob("*.yaml")),
    *sorted((REPO / "deploy" / "systemd").iterdir()),
]
ENV = re.compile(r"\bROUTERD_[A-Z_]+\b")


def run_flags() -> set[str]:
    return {o for param in run.params for o in param.opts if o.startswith("--")}


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_routerd_variable_is_a_flag_of_routerd_run(path: Path) -> None:
    """Each ROUTERD_* a deployment file sets is the variable of a `routerd run` flag,
    so a typo cannot silently leave a setting at its default."""
    known = {env_name(flag) for flag in run_flags()}
    unknown = set(ENV.findall(path.read_text())) - known
    assert not unknown, f"{path.name} names variables no flag reads: {sorted(unknown)}"


def test_the_kubernetes_templates_configmap_is_current() -> None:
    """deploy/kubernetes/templates-configmap.yaml holds exactly templates/nginx/*.j2."""
    script = REPO / "deploy" / "kubernetes" / "sync_templates.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("0.0.0.0:9145", "http://127.0.0.1:9145/healthz"),
        ("127.0.0.1:19145", "http://127.0.0.1:19145/healthz"),
        ("[::]:9145", "http://[::1]:9145/healthz"),
        ("10.1.2.3:9145", "http://10.1.2.3:9145/healthz"),
    ],
)
def test_the_image_health_check_asks_routerd_where_it_listens(listen: str, url: str) -> None:
    """The HEALTHCHECK script turns --metrics-listen into an address it can connect to."""
    healthcheck = load(REPO / "deploy" / "docker" / "healthcheck.py")
    assert healthcheck.url(listen, "/healthz") == url

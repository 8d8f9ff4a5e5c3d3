"""Write templates-configmap.yaml from templates/nginx, or check that it is current.

    python3 deploy/kubernetes/sync_templates.py           rewrite it
    python3 deploy/kubernetes/sync_templates.py --check   exit 1 when it or router.yaml is stale

The ConfigMap replaces the image's templates in the pod (ROUTERD_TEMPLATES),
so a stale copy would quietly render an older router: tests/unit runs --check.
ConfigMap keys cannot hold a "/", so lua/routerd.lua is stored as
lua_routerd.lua and router.yaml's `items:` put it back in its folder; --check
compares those too. Standard library only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE.parents[1] / "templates" / "nginx"
TARGET = HERE / "templates-configmap.yaml"
DEPLOYMENT = HERE / "router.yaml"
ITEM = re.compile(r"- key: (\S+)\s+path: (\S+)")

HEADER = """\
# routerd's templates, mounted at /etc/routerd/templates (ROUTERD_TEMPLATES).
# Generated from templates/nginx by deploy/kubernetes/sync_templates.py: edit
# the templates there, or edit this copy to customise one deployment; routerd
# re-renders when the kubelet updates the mounted files.
apiVersion: v1
kind: ConfigMap
metadata:
  name: routerd-templates
  labels:
    app.kubernetes.io/name: routerd
data:
"""


def files() -> dict[str, str]:
    """ConfigMap key -> path under the templates folder."""
    paths = sorted(p.relative_to(TEMPLATES).as_posix() for p in TEMPLATES.rglob("*") if p.is_file())
    return {path.replace("/", "_"): path for path in paths}


def block(name: str, text: str) -> str:
    """One data entry as a YAML literal block that round-trips ``text`` exactly."""
    if not text.endswith("\n"):
        indicator = "|-"
    elif text.endswith("\n\n"):
        indicator = "|+"
    else:
        indicator = "|"
    if text[:1] in (" ", "\n"):  # the first line cannot tell YAML the indentation
        indicator = "|4" + indicator[1:]
    body = "".join(f"    {line}" if line.strip("\n") else line for line in text.splitlines(True))
    return f"  {name}: {indicator}\n{body}" + ("" if text.endswith("\n") else "\n")


def render() -> str:
    entries = files().items()
    return HEADER + "".join(block(key, (TEMPLATES / path).read_text()) for key, path in entries)


def main(argv: list[str]) -> int:
    wanted = render()
    if argv[1:] != ["--check"]:
        TARGET.write_text(wanted)
        print(f"wrote {TARGET}; router.yaml's templates volume needs these items:")
        for key, path in files().items():
            print(f"  - key: {key}\n    path: {path}")
        return 0
    stale = []
    if not TARGET.exists() or TARGET.read_text() != wanted:
        stale.append(f"{TARGET.name} is stale: run python3 {Path(__file__).name}")
    if dict(ITEM.findall(DEPLOYMENT.read_text())) != files():
        stale.append(f"{DEPLOYMENT.name}: the templates volume's items must be {files()}")
    for line in stale:
        print(line, file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Template hot reload: a change in --templates is rendered like an etcd change,
and a broken template is rejected like any bad candidate."""

from __future__ import annotations

import shutil

import pytest
from helpers import REPO, app_keys, wait_for

pytestmark = pytest.mark.integration

MARKER = "    add_header X-Routerd-Template edited always;\n"


def test_template_edits_go_live_and_a_broken_one_keeps_the_last_config(
    etcd, routerd, backends, tmp_path
):
    """Editing app.conf.j2 reaches nginx without a restart; a syntax error is
    reported under the templates folder while the last config serves on; fixing
    it clears the error."""
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates" / "nginx", templates)
    (backend,) = backends(1)
    router = routerd(extra_args=("--templates", str(templates)))
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [backend])))
    assert "X-Routerd-Template" not in router.http("shop.example.com").headers

    app_template = templates / "app.conf.j2"
    original = app_template.read_text()
    edited = original.replace(
        "server {\n    listen {{ http_listen | q }}{{ http_options }};\n",
        "server {\n    listen {{ http_listen | q }}{{ http_options }};\n" + MARKER,
        1,
    )
    assert edited != original, "the template no longer has the line this test edits after"
    app_template.write_text(edited)
    wait_for(
        lambda: router.http("shop.example.com").headers.get("X-Routerd-Template") == "edited",
        timeout=15,
        message="the edited template to be served",
    )

    app_template.write_text(edited + "{% if %}\n")
    wait_for(
        lambda: any(str(templates) in e["key"] for e in (router.status() or {}).get("errors", [])),
        timeout=15,
        message="the broken template to be reported",
    )
    answer = router.http("shop.example.com")
    assert (answer.text.strip(), answer.headers.get("X-Routerd-Template")) == (
        backend.name,
        "edited",
    )

    app_template.write_text(original)
    wait_for(
        lambda: (
            "X-Routerd-Template" not in router.http("shop.example.com").headers
            and not (router.status() or {}).get("errors")
        ),
        timeout=15,
        message="the fixed template to be served and the error cleared",
    )

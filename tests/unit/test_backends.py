"""The push channel's folder: only routerd's user may enter it."""

from __future__ import annotations

from pathlib import Path

import pytest

from routerd.errors import ConfigError
from routerd.router.backends import Backends
from routerd.router.settings import PACKAGE_TEMPLATES


def backends(tmp_path: Path) -> Backends:
    return Backends(state_dir=tmp_path / "state", runtime_dir=tmp_path, templates=PACKAGE_TEMPLATES)


def test_the_socket_folder_is_made_owner_only(tmp_path: Path) -> None:
    """prepare() leaves the socket's folder with mode 0700, even if it was open before."""
    (tmp_path / "private").mkdir(mode=0o777)
    backends(tmp_path).prepare()
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700


def test_a_socket_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """A link in place of the folder could send the socket elsewhere: refused, naming the flag."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "private").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="--runtime-dir"):
        backends(tmp_path).prepare()

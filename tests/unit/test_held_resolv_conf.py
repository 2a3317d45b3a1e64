"""HeldResolvConf (link/dns.py): resolv.conf read through directory descriptors, as a
confined relay reads it, its links followed within the directories it holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relaynat.link.dns import HeldResolvConf, read_resolv_conf


def _text(dirs: HeldResolvConf) -> str | None:
    at = dirs.where()
    return read_resolv_conf(*at) if at is not None else None


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("etc", "run/a", "run/b"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "run/a/resolv.conf").write_text("nameserver 192.0.2.1\n")
    (tmp_path / "run/b/resolv.conf").write_text("nameserver 192.0.2.2\n")
    (tmp_path / "etc/other.conf").write_text("nameserver 192.0.2.3\n")
    (tmp_path / "etc/resolv.conf").symlink_to("../run/a/resolv.conf")  # relative
    return tmp_path


def _relink(link: Path, target: str) -> None:
    """Point `link` at `target` by rename(2), as network managers switch."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(target)
    os.replace(new, link)


def test_a_link_is_followed_within_the_directories_held(tree: Path) -> None:
    link = tree / "etc/resolv.conf"
    dirs = HeldResolvConf(str(link))
    try:
        assert sorted(dirs.dirs) == [str(tree / "etc"), str(tree / "run/a")]
        assert _text(dirs) == "nameserver 192.0.2.1\n"
        _relink(link, str(tree / "etc/other.conf"))  # absolute, into the link's directory
        assert _text(dirs) == "nameserver 192.0.2.3\n"
        _relink(link, "other.conf")
        assert _text(dirs) == "nameserver 192.0.2.3\n"
        _relink(link, "../run/a/resolv.conf")
        assert _text(dirs) == "nameserver 192.0.2.1\n"
        # Another directory: not held, so not read (a confined process has no path there).
        _relink(link, str(tree / "run/b/resolv.conf"))
        assert dirs.where() is None
        # A file in place of the link, replaced by rename: read.
        (tree / "etc/plain").write_text("nameserver 192.0.2.9\n")
        os.replace(tree / "etc/plain", link)
        assert _text(dirs) == "nameserver 192.0.2.9\n"
    finally:
        dirs.close()


def test_a_loop_of_links_ends(tree: Path) -> None:
    link = tree / "etc/resolv.conf"
    _relink(link, "loop")
    (tree / "etc/loop").symlink_to("resolv.conf")
    dirs = HeldResolvConf(str(link))
    try:
        assert dirs.where() is None
    finally:
        dirs.close()


def test_reading_needs_no_path_from_the_root(tree: Path) -> None:
    """The descriptors are opened once; later reads go through them (openat), not
    through the path given, which a confined relay could not open."""
    dirs = HeldResolvConf(str(tree / "etc/resolv.conf"))
    try:
        os.rename(tree, str(tree) + ".moved")  # every path given before is gone now
        assert _text(dirs) == "nameserver 192.0.2.1\n"
    finally:
        dirs.close()
        os.rename(str(tree) + ".moved", tree)

"""requirements.lock is what setup.cfg asks for, and the environment is exactly the lock."""

from __future__ import annotations

import importlib.util
import re
import sysconfig
from importlib import metadata

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts" / "lockfile.py")
lockfile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lockfile)


def test_the_lock_matches_setup_cfg():
    found = lockfile.problems()
    assert found == [], "requirements.lock disagrees with setup.cfg:\n" + "\n".join(found)


def test_every_lock_entry_carries_a_hash():
    text = (ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 3)[3])
    pinned = [e for e in entries if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==", e)]
    assert len(pinned) == len(lockfile.locked()) > 100
    assert [e.split(" ")[0] for e in pinned if "--hash=sha256:" not in e] == []


@pytest.mark.parametrize(
    "edit,says",
    [
        (("    faiss-cpu>=1.8\n", "    faiss-cpu>=1.8\n    left-pad==1.0\n"), "has no left-pad"),
        (("    hydra-core==1.3.8\n", "    hydra-core==1.3.7\n"), "pins hydra-core==1.3.8"),
        (("    pytest-timeout>=2.3\n", ""), "dependencies changed"),
    ],
)
def test_a_stale_lock_is_named(edit, says, tmp_path):
    cfg = (ROOT / "setup.cfg").read_text()
    old, new = edit
    assert old in cfg
    (tmp_path / "setup.cfg").write_text(cfg.replace(old, new))
    found = lockfile.problems(tmp_path / "setup.cfg")
    assert any("dependencies changed" in p for p in found), found  # the digest moves with any edit
    assert any(says in p and "make lock" in p for p in found), found


def test_the_environment_is_exactly_the_lock():
    """make env installs the lock and nothing else (besides this project, editable). Read from the
    environment's site-packages only: Ray puts its vendored copies (ray/thirdparty_files: colorama,
    psutil) on sys.path once imported, and those are part of the ray wheel, not installed packages."""
    pins = lockfile.locked()
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {lockfile._normal(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}
    installed.pop("towerrec", None)
    wrong = {name: (installed.get(name), version) for name, version in pins.items() if installed.get(name) != version}
    extra = sorted(set(installed) - set(pins))
    assert wrong == {}, f"installed vs locked differ (run make env): {wrong}"
    assert extra == [], f"installed but not in requirements.lock (run make env): {extra}"

"""requirements.lock against setup.cfg: the digest that ties them, and the checks that they agree.

    python scripts/lockfile.py stamp   # after `uv pip compile`: write the digest of setup.cfg's dependencies
    python scripts/lockfile.py check   # exit 1, naming what disagrees, when the lock is stale
    python scripts/lockfile.py entry torch   # one entry of the lock, with its hashes (torch goes in first)

The digest covers the dependency lists only (``install_requires`` and every extra), normalised, so
editing a comment or the description does not make the lock stale; adding, removing or changing a
requirement does. tests/unit/test_lockfile.py runs the same checks on the tree and on the installed
environment.
"""

from __future__ import annotations

import configparser
import hashlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP_CFG = ROOT / "setup.cfg"
LOCK = ROOT / "requirements.lock"
DIGEST_LINE = "# setup.cfg dependencies sha256: "
# what make env installs from the lock's extras (scripts/bootstrap.sh, scripts/lock.sh)
EXTRAS = ("test", "deepspeed", "dev")


def _lines(value: str) -> list[str]:
    out = []
    for line in value.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def requirements(setup_cfg: Path = SETUP_CFG) -> dict[str, list[str]]:
    """``{"install_requires": [...], "extra:<name>": [...]}`` as written in setup.cfg."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg)
    out = {"install_requires": _lines(parser.get("options", "install_requires", fallback=""))}
    if parser.has_section("options.extras_require"):
        for name, value in parser.items("options.extras_require"):
            out[f"extra:{name}"] = _lines(value)
    return out


def digest(reqs: dict[str, list[str]]) -> str:
    canon = "\n".join(f"{group}: {' '.join(r.replace(' ', '') for r in sorted(items))}" for group, items in sorted(reqs.items()))
    return hashlib.sha256(canon.encode()).hexdigest()


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: Path = LOCK) -> dict[str, str]:
    """Package name (normalised) -> pinned version, for every entry of the lock."""
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            pins[_normal(m.group(1))] = m.group(3)
    return pins


def stamped_digest(lock: Path = LOCK) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line[len(DIGEST_LINE) :].strip()
    return None


def problems(setup_cfg: Path = SETUP_CFG, lock: Path = LOCK) -> list[str]:
    """Why the lock does not match setup.cfg (empty when it does)."""
    from packaging.requirements import Requirement

    if not lock.is_file():
        return [f"{lock.name} is missing: run `make lock`"]
    reqs = requirements(setup_cfg)
    out = []
    stamp = stamped_digest(lock)
    if stamp != digest(reqs):
        out.append(f"setup.cfg's dependencies changed since {lock.name} was generated (its digest line says {stamp}): run `make lock`")
    pins = locked(lock)
    groups = ["install_requires"] + [f"extra:{e}" for e in EXTRAS]
    for group in groups:
        if group not in reqs:
            out.append(f"setup.cfg has no extra {group.split(':')[1]!r}, which the lock installs")
            continue
        for text in reqs[group]:
            req = Requirement(text)
            pin = pins.get(_normal(req.name))
            if pin is None:
                out.append(f"setup.cfg {group} asks for {text!r}; {lock.name} has no {req.name}: run `make lock`")
            elif not req.specifier.contains(pin, prereleases=True):
                out.append(f"setup.cfg {group} asks for {text!r}; {lock.name} pins {req.name}=={pin}: run `make lock`")
    return out


def stamp(setup_cfg: Path = SETUP_CFG, lock: Path = LOCK) -> None:
    text = [line for line in lock.read_text().splitlines() if not line.startswith(DIGEST_LINE)]
    lock.write_text("\n".join([DIGEST_LINE + digest(requirements(setup_cfg))] + text) + "\n")


def entry(name: str, lock: Path = LOCK) -> str:
    """One package's entry of the lock, with its hashes, as a requirements file."""
    lines = lock.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{name}=="):
            block = [line]
            while block[-1].rstrip().endswith("\\"):
                i += 1
                block.append(lines[i])
            return "\n".join(block) + "\n"
    raise SystemExit(f"{lock}: no {name}== entry")


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "check"
    if cmd == "stamp":
        stamp()
    elif cmd == "entry" and len(argv) > 2:
        sys.stdout.write(entry(argv[2]))
    elif cmd == "check":
        found = problems()
        for p in found:
            print(f"requirements.lock: {p}", file=sys.stderr)
        return 1 if found else 0
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

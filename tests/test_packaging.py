"""What a release ships: the sdist has what its tests need, the wheel the man page and the
systemd units as data files, both the licence; README's install steps put the man page
where man(1) finds it.

The sdist and wheel are built from a copy of the tree's files (tracked or new, not
ignored), the wheel from the sdist, as `python -m build` does, offline (--no-isolation).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


def tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=TOP,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (TOP / f).is_file()]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    src = tmp_path_factory.mktemp("src")
    for f in tree_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(TOP / f, src / f)
    out = src / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return sdist, wheel


@pytest.mark.slow  # builds the sdist and the wheel: seconds
def test_wheel_ships_man_page_systemd_units_and_licence(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        data = "nbdbackup-0.1.0.data/data/"
        assert z.read(data + "share/man/man1/nbdbackup.1") == (TOP / "man/nbdbackup.1").read_bytes()
        for unit in ("nbdbackup.service", "nbdbackup.timer"):
            assert z.read(f"{data}share/nbdbackup/systemd/{unit}") == (TOP / "scripts/systemd" / unit).read_bytes()
        assert z.read("nbdbackup-0.1.0.dist-info/licenses/LICENSE") == (TOP / "LICENSE").read_bytes()
        meta = z.read("nbdbackup-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: GPL-2.0-or-later" in meta
    assert "GNU GENERAL PUBLIC LICENSE" in (TOP / "LICENSE").read_text() and "Version 2, June 1991" in (TOP / "LICENSE").read_text()
    assert "nbdbackup/cli/__init__.py" in names and "nbdbackup/repository/repository.py" in names
    assert not [n for n in names if n.startswith("tests/")]


@pytest.mark.slow  # builds the sdist and the wheel: seconds
def test_sdist_holds_what_its_tests_and_scripts_need(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    tracked = {f for f in tree_files() if not f.startswith("dist/")}
    needed = {f for f in tracked if f.startswith(("tests/", "scripts/", "docs/", "man/", "nbdbackup/"))}
    needed |= {"LICENSE", "README.md", "pyproject.toml"}
    assert needed - names == set()


def test_readme_install_steps_put_the_man_page_where_man_finds_it(tmp_path):
    """Run README's man page lines with /usr/local under tmp_path; man-db must search that directory."""
    readme = (TOP / "README.md").read_text()
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("#", 1)[0].strip() for block in re.findall(r"```sh\n(.*?)```", install, re.S) for line in block.splitlines()]
    man_lines = [line for line in lines if "man1" in line]
    assert man_lines, "README's install steps do not install the man page"
    prefix = tmp_path / "root"
    for line in man_lines:
        line = line.replace("/usr/local", f"{prefix}/usr/local").replace("/opt/nbdbackup", str(TOP))
        subprocess.run(line, shell=True, check=True)
    manpath = prefix / "usr/local/share/man"
    found = subprocess.run(["man", "--manpath", str(manpath), "-w", "nbdbackup"], capture_output=True, text=True)
    assert found.returncode == 0 and Path(found.stdout.strip()).resolve() == (TOP / "man/nbdbackup.1").resolve(), found
    # ... and /usr/local/share/man is where man-db looks on Debian without any MANPATH.
    config = Path("/etc/manpath.config").read_text()
    assert re.search(r"^MANDATORY_MANPATH\s+/usr/local/share/man\s*$", config, re.M), "man-db does not search /usr/local/share/man"
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    rendered = subprocess.run(["man", "-l", str(manpath / "man1/nbdbackup.1")], capture_output=True, text=True, env=env | {"MANWIDTH": "80"})
    assert rendered.returncode == 0 and "incremental backups of running QEMU" in rendered.stdout

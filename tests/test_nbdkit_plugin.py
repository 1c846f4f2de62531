"""nbdkit's side of serving, without running nbdkit: which nbdbackup nbdkit's embedded Python
imports (the plugin, with a stand-in `nbdkit` module) and how many threads nbdkit gets.  Serving
itself is tested end to end in test_serve.py."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import nbdbackup


def load_plugin(monkeypatch):
    monkeypatch.setitem(sys.modules, "nbdkit", types.SimpleNamespace(THREAD_MODEL_PARALLEL=3))
    spec = importlib.util.spec_from_file_location("nbdkit_plugin_under_test", Path(nbdbackup.__file__).with_name("nbdkit_plugin.py"))
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    return plugin


def test_the_plugin_puts_nbdbackups_own_path_first_in_its_order(monkeypatch, tmp_path):
    """nbdbackup started from a checkout (PYTHONPATH=checkout), another nbdbackup installed
    (an editable install's .pth names its directory): nbdkit inherits PYTHONPATH, so the checkout
    is already on the embedded Python's path, behind nothing; it must stay ahead of the installed
    one, or the checkout's plugin would read backups with the installed nbdbackup."""
    checkout, site_packages, installed, system = (tmp_path / n for n in ("checkout", "site-packages", "installed", "dist-packages"))
    for d in (checkout, site_packages, installed, system):
        d.mkdir()
    (site_packages / "__editable__.nbdbackup.pth").write_text(f"{installed}\n")
    plugin = load_plugin(monkeypatch)
    monkeypatch.setattr(sys, "path", [str(checkout), str(system)])  # the embedded Python's, PYTHONPATH first
    plugin.config("path", ":".join(map(str, [checkout, checkout, site_packages, installed])))  # nbdbackup's sys.path
    assert sys.path == [str(checkout), str(site_packages), str(installed), str(system)]


def test_what_a_pth_file_adds_goes_behind_nbdbackups_path(monkeypatch, tmp_path):
    site_packages, extra, system = (tmp_path / n for n in ("site-packages", "extra", "dist-packages"))
    for d in (site_packages, extra, system):
        d.mkdir()
    (site_packages / "extra.pth").write_text(f"{extra}\n")
    plugin = load_plugin(monkeypatch)
    monkeypatch.setattr(sys, "path", [str(system)])
    plugin.config("path", str(site_packages))
    assert sys.path == [str(site_packages), str(extra), str(system)]


def test_nbdkit_threads_follow_the_cpus_for_a_directory_and_stay_many_for_s3(monkeypatch):
    """A directory's reads are CPU work: at most twice the CPUs (at least 4, at most THREADS);
    S3's wait for the network: THREADS."""
    from nbdbackup import serving

    for cpus, want in ((1, 4), (2, 4), (3, 6), (8, serving.THREADS), (64, serving.THREADS)):
        monkeypatch.setattr(serving.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert serving.nbdkit_threads("/srv/backups") == want
        assert serving.nbdkit_threads("s3://bucket/prefix") == serving.THREADS
    source = serving.Source("/srv/backups", None, "vm1", "cp", ("vda",))
    monkeypatch.setattr(serving.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(serving, "need_program", lambda name, package: name)
    cmd = serving.nbdkit_command(source)
    assert cmd[cmd.index("--threads") + 1] == "4"

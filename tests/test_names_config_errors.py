"""Names, settings resolution and the exit-code table (pure logic)."""

import signal

import pytest

from nbdbackup import config, errors
from nbdbackup.names import check_name, new_checkpoint_name


@pytest.mark.parametrize("bad", ["", "..", ".hidden", "a/b", "../x", "a\nb", "a\x00b", "x" * 65, "-rf", "é"])
def test_unsafe_names_are_refused(bad):
    with pytest.raises(errors.UsageError):
        check_name("checkpoint", bad)


def test_generated_checkpoint_names_are_safe_unique_and_sortable():
    names = [new_checkpoint_name() for _ in range(50)]
    assert len(set(names)) == 50
    for n in names:
        check_name("checkpoint", n)
    stamps = [n.split("-")[0] for n in names]
    assert stamps == sorted(stamps)


def test_exit_codes_are_pinned():
    """Scripts and cron jobs depend on these numbers: changing one is a breaking change."""
    assert {k: v for k, v in errors.EXIT_CODES.items() if k not in ("address", "mount-point", "tool", "rolled-back", "qemu")} == {
        "success": 0, "unexpected": 1, "usage": 2, "vm": 3, "chain": 4, "locked": 5,
        "damaged": 6, "repository": 7, "restore-target": 8, "sigint": 130, "sigterm": 143,
        "s3-credentials": 9, "s3-bucket-missing": 10, "s3-access-denied": 11, "s3-unreachable": 12,
        "image-in-use": 16, "rollback-incomplete": 17,
        "no-key": 18, "wrong-passphrase": 19, "foreign-key": 20, "key-damaged": 21, "encryption-mismatch": 22,
    }
    assert {k: errors.EXIT_CODES[k] for k in ("address", "mount-point", "tool")} == {"address": 13, "mount-point": 14, "tool": 15}
    assert errors.EXIT_CODES["rolled-back"] == 27
    assert errors.Interrupted(signal.SIGTERM).exit_code == 143
    assert errors.VMUnsuitable("x").exit_code == 3
    assert errors.ChainBroken("x").exit_code == 4
    assert errors.EXIT_CODES["qemu"] == 33 == errors.QEMUCommandFailed("c", "GenericError", "d").exit_code == errors.NbdIOError("x").exit_code


def test_settings_precedence(tmp_path, monkeypatch):
    conf = tmp_path / "c.toml"
    conf.write_text('repository = "/from/config"\n[vm.vm1]\nqmp = "/q.sock"\ndisks = ["vda"]\ncompression = 5\n')
    monkeypatch.delenv("NBDBACKUP_REPO", raising=False)
    monkeypatch.setenv("NBDBACKUP_CONFIG", str(conf))
    s = config.load(None, None)
    assert str(s.repo) == "/from/config"
    assert s.vm("vm1").disks == ("vda",) and s.vm("vm1").compression == 5
    assert str(s.vm("vm1", "/other.sock").qmp) == "/other.sock"
    monkeypatch.setenv("NBDBACKUP_REPO", "/from/env")
    assert str(config.load(None, None).repo) == "/from/env"
    assert str(config.load(None, "/from/option").repo) == "/from/option"
    with pytest.raises(errors.VMUnreachable, match="no QMP socket"):
        s.vm("other")


@pytest.mark.parametrize(
    "text, words",
    [("[vm.vm1\n", "not valid TOML"), ("[vm.vm1]\nqmpp = 'x'\n", "unknown setting"),
     ("[vm.vm1]\nqmp = 3\n", "must be a str"), ("[vm.'../x']\nqmp = 'x'\n", "not allowed")],
)
def test_bad_config_is_a_usage_error(tmp_path, text, words):
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    with pytest.raises(errors.UsageError, match=words):
        config.load(str(conf), None)


@pytest.mark.parametrize(
    "text, words",
    [("[vm.vm1]\ncompression = 30\n", "compression"), ("[vm.vm1]\ncompression = 0\n", "compression"),
     ("[vm.vm1]\ncompression = -21\n", "compression"), ("[vm.vm1]\nworkers = 0\n", "workers"),
     ("repositry = '/x'\n", "unknown setting"), ("[vm.vm1]\nretention = { dayly = 3 }\n", "retention.dayly")],
)
def test_out_of_range_settings_are_usage_errors(tmp_path, text, words):
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    with pytest.raises(errors.UsageError, match=words):
        config.load(str(conf), None)


def test_bad_timeouts_are_usage_errors(monkeypatch):
    monkeypatch.setenv("NBDBACKUP_CONNECT_TIMEOUT", "soon")
    with pytest.raises(errors.UsageError, match="NBDBACKUP_CONNECT_TIMEOUT"):
        config.env_seconds("NBDBACKUP_CONNECT_TIMEOUT", 10)
    monkeypatch.setenv("NBDBACKUP_CONNECT_TIMEOUT", "2.5")
    assert config.env_seconds("NBDBACKUP_CONNECT_TIMEOUT", 10) == 2.5


def test_data_path_settings_reach_the_tuning(tmp_path):
    from nbdbackup.engine import tuning_for

    conf = tmp_path / "c.toml"
    conf.write_text('[vm.vm1]\nqmp = "/q"\ncompression = 1\nworkers = 2\nchunk_mib = 1\nqueue_depth = 3\n')
    t = tuning_for(config.load(str(conf), None).vm("vm1"))
    assert (t.level, t.workers, t.chunk_size, t.depth) == (1, 2, 1 << 20, 3)
    conf.write_text('[vm.vm1]\nqmp = "/q"\ncompression = -3\n')  # zstd's fast levels are allowed
    assert tuning_for(config.load(str(conf), None).vm("vm1")).level == -3
    conf.write_text('[vm.vm1]\nchunk_mib = 64\n')
    with pytest.raises(errors.UsageError, match="chunk_mib"):
        config.load(str(conf), None)

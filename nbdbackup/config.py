"""Settings: command line, then environment, then the TOML config file, then defaults.

    repository = "/var/lib/nbdbackup"      # optional
    encryption = "repokey"                 # optional: a new repository is encrypted (repokey, keyfile, none)
    [vm.NAME]
    qmp = "/run/NAME-backup.qmp"           # the VM's QMP socket reserved for backups
    qga = "/run/NAME-qga.sock"             # qemu-guest-agent socket, for --fsfreeze
    disks = ["vda", "vdb"]                 # only these disks (default: every qcow2 disk)
    exclude = ["vdc"]                      # never these disks
    compression = 1                        # zstd level (-20..-1 fast, 1..22)
    workers = 4                            # compression and I/O threads, one NBD connection each
    chunk_mib = 4                          # largest chunk, MiB (1..32)
    queue_depth = 8                        # chunks in flight (memory: queue_depth x chunk_mib)
    scratch = "/var/tmp/nbdbackup"         # where fleecing overlays grow
    images = { vda = "/srv/NAME/vda.qcow2" }   # the disks' images, for `rollback` of the shut-down VM
    retention = { last = 3, daily = 7, weekly = 4, monthly = 12 }   # for `prune`

A repository in S3 object storage (repository = "s3://BUCKET/PREFIX"):

    [s3]
    endpoint = "https://s3.example.net"    # default: AWS
    region = "eu-west-1"
    addressing = "path"                    # "auto" (default), "path" or "virtual"
    verify_tls = true                      # false only for test setups
    ca_bundle = "/etc/ssl/private-ca.pem"
    profile = "backup"                     # a profile of ~/.aws/credentials (else $AWS_PROFILE)
    credentials_file = "/etc/nbdbackup/s3.credentials"   # AWS-style, mode 0600
    retries = 5                            # attempts per request on transient errors

    [s3."s3://offsite/hypervisor1"]        # only for repositories at or below this bucket/prefix
    endpoint = "https://s3.offsite.example"    # (every [s3] setting; these win over [s3]'s)
    credentials_file = "/etc/nbdbackup/offsite.credentials"

For `verify --boot` (in a [vm.NAME] table):

    boot = ["-m", "2048"]                  # QEMU arguments for `verify --boot`
    verify_boot = true                     # `auto` runs `verify --boot` after each backup
    boot_timeout = 300                     # seconds `verify --boot` waits for a sign of life
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError, VMUnreachable
from .names import check_name
from .repository.location import Location, S3Location, S3Settings, parse_location

SYSTEM_CONFIG = Path("/etc/nbdbackup/config.toml")
MIN_LEVEL, MAX_LEVEL = -20, 22  # zstd levels allowed for `compression` (0 is not one: zstd reads it as 3)
VM_KEYS = {"qmp": str, "qga": str, "disks": list, "exclude": list, "compression": int, "scratch": str, "workers": int,
           "chunk_mib": int, "queue_depth": int, "retention": dict, "images": dict,
           "boot": list, "verify_boot": bool, "boot_timeout": int}
TOP_KEYS = {"repository", "encryption", "vm", "s3"}
ENCRYPTION_MODES = ("repokey", "keyfile", "none")
S3_KEYS: dict[str, type | tuple[type, ...]] = {"endpoint": str, "region": str, "addressing": str, "verify_tls": bool, "ca_bundle": str, "profile": str,
           "credentials_file": str, "retries": int, "connect_timeout": (int, float), "read_timeout": (int, float)}
RETENTION_KEYS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class VMConfig:
    name: str
    qmp: Path | None = None
    qga: Path | None = None
    disks: tuple[str, ...] = ()  # only these disks (default: every qcow2 disk)
    exclude: tuple[str, ...] = ()  # never these disks
    compression: int | None = None
    scratch: Path | None = None
    workers: int | None = None
    chunk_mib: int | None = None
    queue_depth: int | None = None
    retention: dict[str, int] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)  # disk id -> image file (for rollback)
    boot: tuple[str, ...] = ()  # QEMU arguments for verify --boot
    verify_boot: bool = False  # auto: verify --boot after each backup
    boot_timeout: int | None = None  # seconds verify --boot waits for a sign of life


@dataclass(frozen=True)
class Settings:
    repo: Location
    config_file: Path | None
    vms: dict[str, VMConfig] = field(default_factory=dict)
    config_searched: tuple[Path, ...] = ()  # where a config file was looked for, when none was given
    s3: S3Settings = S3Settings()  # the [s3] table: every S3 repository's settings unless a table of its own says otherwise
    encryption: str | None = None  # what a new repository gets; an encrypted choice refuses an unencrypted repository
    metrics_file: Path | None = None  # --metrics-file: the Prometheus textfile every backup run updates
    s3_repositories: dict[S3Location, dict[str, Any]] = field(default_factory=dict)  # [s3."s3://BUCKET[/PREFIX]"] tables (checked)

    def s3_for(self, where: Location) -> S3Settings:
        """The S3 settings of the repository at where: [s3], then each [s3."s3://..."] table
        at or above it (its bucket, then longer prefixes of its path) overriding what it sets."""
        if not isinstance(where, S3Location):
            return self.s3
        mine = where.prefix.split("/") if where.prefix else []
        tables = []
        for loc, table in self.s3_repositories.items():
            parts = loc.prefix.split("/") if loc.prefix else []
            if loc.bucket == where.bucket and mine[:len(parts)] == parts:
                tables.append((len(parts), table))
        settings = self.s3
        for _depth, table in sorted(tables, key=lambda t: t[0]):
            settings = dataclasses.replace(settings, **table)
        return settings

    def vm(self, name: str, qmp: str | None = None, *, required: bool = True) -> VMConfig:
        """The VM's settings, with --qmp taking precedence over the config file.
        required: a QMP socket must be known (VMUnreachable otherwise)."""
        check_name("VM", name)
        base = self.vms.get(name, VMConfig(name))
        if qmp:
            return dataclasses.replace(base, qmp=Path(qmp))
        if base.qmp is None and required:
            where = f" in {self.config_file}" if self.config_file else ""
            raise VMUnreachable(f"no QMP socket known for VM {name!r}{where}", hint=f'pass --qmp SOCKET or add [vm.{name}] qmp = "PATH" to the config file')
        return base


def env_seconds(name: str, default: float) -> float:
    """A timeout from the environment (e.g. NBDBACKUP_CONNECT_TIMEOUT), checked."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{name}={raw!r} is not a positive number of seconds")
    return value


def default_repo() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/nbdbackup")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return Path(data) / "nbdbackup"


def config_candidates() -> list[Path]:
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [SYSTEM_CONFIG, Path(xdg) / "nbdbackup/config.toml"]


def load(config_opt: str | None, repo_opt: str | None, *, needs_config: bool = True) -> Settings:
    """needs_config=False: the command needs only the repository; when the repository is
    given (--repo or NBDBACKUP_REPO), a config file that cannot be used is ignored with a
    warning instead of stopping the command."""
    repo_given = repo_opt or os.environ.get("NBDBACKUP_REPO")
    if needs_config or not repo_given:
        return _load(config_opt, repo_opt)
    try:
        return _load(config_opt, repo_opt)
    except UsageError as exc:
        import logging

        logging.getLogger("nbdbackup").warning("ignoring the config file: %s", exc)
        return Settings(repo=Path(repo_given), config_file=None)


def _load(config_opt: str | None, repo_opt: str | None) -> Settings:
    explicit = config_opt or os.environ.get("NBDBACKUP_CONFIG")
    path: Path | None
    if explicit:
        path = Path(explicit)
        data = _read(path)
        searched: tuple[Path, ...] = ()
    else:
        searched = tuple(config_candidates())
        path = next((p for p in searched if p.exists()), None)
        data = _read(path) if path else {}
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise UsageError(f"{path}: unknown setting {', '.join(sorted(unknown))!r}", hint=f"known: {', '.join(sorted(TOP_KEYS))}")
    vms = _parse_vms(data.get("vm", {}), path)
    repo = repo_opt or os.environ.get("NBDBACKUP_REPO") or data.get("repository")
    if repo is not None and not isinstance(repo, str):
        raise UsageError(f"{path}: 'repository' must be a string")
    encryption = data.get("encryption")
    if encryption is not None and encryption not in ENCRYPTION_MODES:
        raise UsageError(f"{path}: 'encryption' must be one of {', '.join(ENCRYPTION_MODES)}")
    s3, s3_repositories = _parse_s3(data.get("s3", {}), path)
    return Settings(repo=parse_location(repo) if repo else default_repo(), config_file=path, vms=vms, config_searched=searched,
                    s3=s3, encryption=encryption, s3_repositories=s3_repositories)


def _parse_s3(table: Any, path: Path | None) -> tuple[S3Settings, dict[S3Location, dict[str, Any]]]:
    """[s3] and its [s3."s3://BUCKET[/PREFIX]"] tables: (the defaults, each repository table's own settings)."""
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [s3] must be a table")
    base = S3Settings(**_s3_settings({k: v for k, v in table.items() if not k.startswith("s3://")}, path, "[s3]"))
    repositories: dict[S3Location, dict[str, Any]] = {}
    for url, sub in table.items():
        if not url.startswith("s3://"):
            continue
        label = f'[s3."{url}"]'
        if not isinstance(sub, dict):
            raise UsageError(f"{path}: {label} must be a table of S3 settings")
        try:
            where = parse_location(url)
        except UsageError as exc:
            raise UsageError(f"{path}: {label}: {exc.message}", hint=exc.hint) from None
        if not isinstance(where, S3Location) or where in repositories:
            raise UsageError(f"{path}: more than one S3 table for {where}")
        repositories[where] = _s3_settings(sub, path, label)
    return base, repositories


def _s3_settings(table: dict[str, Any], path: Path | None, label: str) -> dict[str, Any]:
    """The checked settings of one S3 table, as S3Settings fields."""
    for key, value in table.items():
        if key not in S3_KEYS:
            hint = f"known: {', '.join(sorted(S3_KEYS))}" + ('; a repository\'s own table is [s3."s3://BUCKET/PREFIX"]' if label == "[s3]" else "")
            raise UsageError(f"{path}: {label} has unknown setting {key!r}", hint=hint)
        if not isinstance(value, S3_KEYS[key]) or (isinstance(value, bool) and key != "verify_tls"):
            raise UsageError(f"{path}: {label} {key} has the wrong type")
    if table.get("addressing", "auto") not in ("auto", "path", "virtual"):
        raise UsageError(f"{path}: {label} addressing must be \"auto\", \"path\" or \"virtual\"")
    if not 1 <= table.get("retries", 5) <= 20:
        raise UsageError(f"{path}: {label} retries must be from 1 to 20")
    changes = dict(table)
    if "credentials_file" in changes:
        changes["credentials_file"] = Path(changes["credentials_file"])
    return changes


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None


def _parse_vms(table: Any, path: Path | None) -> dict[str, VMConfig]:
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [vm] must be a table of [vm.NAME] tables")
    vms = {}
    for name, conf in table.items():
        check_name("VM", name)
        if not isinstance(conf, dict):
            raise UsageError(f"{path}: [vm.{name}] must be a table")
        for key, value in conf.items():
            if key not in VM_KEYS:
                raise UsageError(f"{path}: [vm.{name}] has unknown setting {key!r}", hint=f"known: {', '.join(sorted(VM_KEYS))}")
            if not isinstance(value, VM_KEYS[key]):
                raise UsageError(f"{path}: [vm.{name}] {key} must be a {VM_KEYS[key].__name__}")
        level = conf.get("compression", 1)
        if not MIN_LEVEL <= level <= MAX_LEVEL or level == 0:
            raise UsageError(f"{path}: [vm.{name}] compression must be a zstd level from {MIN_LEVEL} to -1 (fast levels) "
                             f"or 1 to {MAX_LEVEL}")
        for key, low, high in (("workers", 1, 64), ("chunk_mib", 1, 32), ("queue_depth", 1, 64), ("boot_timeout", 1, 86400)):
            if not low <= conf.get(key, low) <= high:
                raise UsageError(f"{path}: [vm.{name}] {key} must be from {low} to {high}")
        retention = conf.get("retention", {})
        for key, value in retention.items():
            if key not in RETENTION_KEYS or not isinstance(value, int) or value < 0:
                raise UsageError(f"{path}: [vm.{name}] retention.{key} is not one of {', '.join(RETENTION_KEYS)} with a count >= 0")
        for disk, image in conf.get("images", {}).items():
            check_name("disk", disk)
            if not isinstance(image, str) or not image:
                raise UsageError(f"{path}: [vm.{name}] images.{disk} must be the path of the disk's image")
        if not all(isinstance(a, str) for a in conf.get("boot", ())):
            raise UsageError(f"{path}: [vm.{name}] boot must be a list of QEMU arguments (strings)")
        for key in ("disks", "exclude"):
            for disk in conf.get(key, ()):
                if not isinstance(disk, str):
                    raise UsageError(f"{path}: [vm.{name}] {key} must be a list of disk ids")
                check_name("disk", disk)
        vms[name] = VMConfig(
            name=name,
            qmp=Path(conf["qmp"]) if "qmp" in conf else None,
            qga=Path(conf["qga"]) if "qga" in conf else None,
            disks=tuple(conf.get("disks", ())),
            exclude=tuple(conf.get("exclude", ())),
            compression=conf.get("compression"),
            scratch=Path(conf["scratch"]) if "scratch" in conf else None,
            workers=conf.get("workers"),
            chunk_mib=conf.get("chunk_mib"),
            queue_depth=conf.get("queue_depth"),
            retention=dict(retention),
            images={disk: Path(image) for disk, image in conf.get("images", {}).items()},
            boot=tuple(conf.get("boot", ())),
            verify_boot=conf.get("verify_boot", False),
            boot_timeout=conf.get("boot_timeout"),
        )
    return vms

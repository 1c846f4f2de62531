"""nbdbackup: incremental backup of running QEMU virtual machines.

Layers, each importing only the ones below it:

    cli            click commands: parse, resolve settings, print, exit
    backup,        orchestration: one engine call per command
    restore, chain
    qmp, nbdio,    adapters: the only importers of qemu.qmp, nbd and the
    repository     storage backend
    records,       frozen dataclasses crossing module boundaries, and the
    errors         exception hierarchy with its exit codes
"""

__version__ = "0.1.0"

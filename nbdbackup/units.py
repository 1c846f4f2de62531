"""How counts and sizes read in messages, for every layer ('1 backup', '3.2MiB')."""

from __future__ import annotations


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 backup', '2 backups', '0 backups' (words: an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)

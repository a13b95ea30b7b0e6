"""`ConfigError` and the value checks that several sections share (AE titles, networks,
time-outs, certificate and key pairs)."""

from __future__ import annotations

import ipaddress
import math
import re


class ConfigError(ValueError):
    """A configuration problem, with the offending key in its message."""


def alternatives(choices: list[str]) -> str:
    """'a, b or c'."""
    *rest, last = choices
    return f"{', '.join(rest)} or {last}" if rest else last


# PS3.5 6.2: an AE title is at most 16 characters of the default repertoire, no backslash and
# no control characters, and not only spaces.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


def check_ae_title(key: str, title: str) -> None:
    if not _AE_TITLE.fullmatch(title) or not title.strip():
        raise ConfigError(
            f"{key}: an AE title is 1 to 16 printable characters without backslash, got {title!r}"
        )


def check_network(key: str, entry: str) -> None:
    """An IP address or a CIDR network without host bits ('10.1.0.0/16', not '10.1.2.3/16':
    that typo would silently allow a different range than meant)."""
    try:
        ipaddress.ip_network(entry)
    except ValueError as error:
        raise ConfigError(
            f"{key}: expected an IP address or a CIDR network such as '10.1.0.0/16', got "
            f"{entry!r} ({error})"
        ) from None


def check_timeout(key: str, seconds: float) -> None:
    # TOML has inf and nan: "never" is exactly what a time-out must not be.
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{key}: must be a number of seconds > 0, got {seconds}")


def check_key_pair(prefix: str, certificate: str, private_key: str) -> None:
    if bool(certificate) != bool(private_key):
        missing = "tls_private_key" if certificate else "tls_certificate"
        raise ConfigError(f"{prefix}.{missing}: tls_certificate and tls_private_key go together")

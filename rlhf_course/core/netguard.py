"""A guard that refuses every network connection except loopback.

The course's laptop profile must never touch the network.  Tests (``tests/conftest.py``) and CI
kernels (``RLHF_COURSE_NETWORK_GUARD=1``) install this guard, so an accidental download fails
loudly and at once instead of hanging or silently fetching weights.
"""

from __future__ import annotations

import ipaddress
import os
import socket

ENV_VAR = "RLHF_COURSE_NETWORK_GUARD"
_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


class NetworkBlockedError(RuntimeError):
    """Raised when code tries to reach a non-loopback address while the guard is on."""


def _is_allowed(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name that is not localhost
        return False


def _guarded_connect(self, address):
    if not _is_allowed(address):
        raise NetworkBlockedError(
            f"Network access to {address!r} is blocked: the laptop profile runs offline. "
            "If this came from a model or data set load, use an asset from "
            "rlhf_course.core.assets (see notebook 00), or unset "
            f"{ENV_VAR} and run with RLHF_PROFILE=full on a machine with internet."
        )
    return _original_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_allowed(address):
        _guarded_connect(self, address)  # raises with the explanatory message
    return _original_connect_ex(self, address)


def install() -> None:
    """Block all non-loopback connections in this process."""
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex


def uninstall() -> None:
    socket.socket.connect = _original_connect
    socket.socket.connect_ex = _original_connect_ex


def is_installed() -> bool:
    return socket.socket.connect is _guarded_connect


def install_if_requested() -> None:
    if os.environ.get(ENV_VAR, "") not in ("", "0"):
        install()

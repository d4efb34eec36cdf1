"""A guard that refuses every network connection except loopback.

The course's laptop profile must never touch the network.  Tests (``tests/conftest.py``) and CI
kernels (``RLHF_COURSE_NETWORK_GUARD=1``) install this guard, so an accidental download fails
loudly and at once instead of hanging or silently fetching weights.

What it covers.  Every way a Python socket names a peer: ``connect``, ``connect_ex``, ``sendto``
and ``sendmsg`` (UDP datagrams and TCP Fast Open name their peer per call, not with ``connect``).
``socket.socket`` is a Python subclass of the C type ``_socket.socket``, whose methods cannot be
patched (CPython refuses to set attributes on an immutable built-in type), so the guard

* patches the four methods on ``socket.socket``, which covers the standard library, ``ssl``,
  ``asyncio``, ``requests``/``urllib3``/``httpx`` and everything else built on ``socket.socket``;
* replaces the module attribute ``_socket.socket`` (and its alias ``SocketType``, in ``_socket``
  and ``socket``) with a guarded subclass, so code that builds
  C-level sockets itself (``import _socket; _socket.socket().connect(...)``) is refused too.
  The subclass adds no state and no ``__init__`` (``socket.socket.__init__`` calls
  ``_socket.socket.__init__``, which still resolves to the C one), and its metaclass keeps
  ``isinstance(sock, _socket.socket)`` true for every real socket, so the swap changes nothing
  but the four methods.  A reference taken before the guard was installed
  (``from _socket import socket``) keeps the unguarded class: no Python-level guard can reach it.

DNS look-ups (``getaddrinfo``) happen in the C library and are not blocked; offline, they fail by
themselves.

What stays open: loopback in any spelling (``localhost`` in any case, with or without a trailing
dot; 127.0.0.0/8 in any form the OS accepts, such as ``127.1``; ``::1`` in any spelling, with or
without a scope; ``::ffff:127.0.0.1``), the unspecified address (``''``, ``0.0.0.0``, ``::``:
the OS routes it to this machine), Unix-domain sockets (file paths and abstract names), Netlink
and AF_ALG (kernel interfaces, not networks) and AF_PACKET on the ``lo`` interface.  Everything
else raises ``NetworkBlockedError``, which names the host, the port and what to do.
"""

from __future__ import annotations

import _socket
import ipaddress
import os
import socket

ENV_VAR = "RLHF_COURSE_NETWORK_GUARD"
GUARDED_METHODS = ("connect", "connect_ex", "sendto", "sendmsg")

# The C socket type, even if this module is reloaded while the guard is installed.
_CSocket = getattr(_socket.socket, "_rlhf_unguarded", _socket.socket)
_LOCAL_FAMILIES = {getattr(socket, name) for name in ("AF_UNIX", "AF_NETLINK", "AF_ALG") if hasattr(socket, name)}
_IP_FAMILIES = {socket.AF_INET, socket.AF_INET6}
_AF_PACKET = getattr(socket, "AF_PACKET", None)


class NetworkBlockedError(RuntimeError):
    """Raised when code tries to reach a non-loopback address while the guard is on."""

    def __init__(self, message: str, host=None, port=None, operation: str | None = None):
        super().__init__(message)
        self.host, self.port, self.operation = host, port, operation


# ----------------------------------------------------------------------------- the policy


def is_loopback_host(host) -> bool:
    """True when ``host`` (a socket address's host part) names this machine."""
    if isinstance(host, (bytes, bytearray)):
        try:
            host = bytes(host).decode("ascii")
        except UnicodeDecodeError:
            return False
    if not isinstance(host, str):
        return False
    name = host
    if name.lower() in ("localhost", "localhost.", ""):  # '' is INADDR_ANY: this machine
        return True
    try:
        candidates = [ipaddress.ip_address(name)]
    except ValueError:
        try:  # other numeric forms the OS accepts (127.1, 2130706433, 0x7f.1); never a DNS query
            infos = socket.getaddrinfo(name, None, flags=socket.AI_NUMERICHOST)
            candidates = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        except (OSError, ValueError, UnicodeError):
            return False  # a host name other than localhost
    return bool(candidates) and all(_is_local_ip(address) for address in candidates)


def _is_local_ip(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_loopback or address.is_unspecified


def _family(sock) -> int | None:
    try:
        return int(sock.family)
    except (AttributeError, OSError, TypeError, ValueError):
        return None


def _blocked_peer(sock, address):
    """``(host, port)`` when ``address`` leaves this machine, else ``None``."""
    family = _family(sock)
    if family in _LOCAL_FAMILIES:
        return None
    if family in _IP_FAMILIES:
        if not isinstance(address, tuple) or not address:
            return None  # not an IP address at all: the socket call itself raises TypeError
        host = address[0]
        if not isinstance(host, (str, bytes, bytearray)):
            return None  # the socket call itself raises TypeError
        port = address[1] if len(address) > 1 else None
        return None if is_loopback_host(host) else (host, port)
    if _AF_PACKET is not None and family == _AF_PACKET:
        interface = address[0] if isinstance(address, tuple) and address else address
        return None if interface == "lo" else (interface, None)
    return (address, None)  # Bluetooth, CAN, TIPC, VSOCK...: not loopback


def _refuse(sock, address, operation: str) -> None:
    peer = _blocked_peer(sock, address)
    if peer is None:
        return
    host, port = peer
    where = f"{host!r} port {port}" if port is not None else f"{host!r}"
    raise NetworkBlockedError(
        f"Network access to {where} ({operation}) is blocked: the laptop profile runs offline "
        f"and the network guard ({ENV_VAR}=1, always on in the tests) allows loopback only. "
        "If this came from a model or data set load, use an asset from rlhf_course.core.assets "
        "(see notebook 00, `assets.asset_table()`); in a test, use a packaged asset or a mock. "
        f"To go online on purpose, unset {ENV_VAR} and run with RLHF_PROFILE=full on a machine "
        "with internet.",
        host=host,
        port=port,
        operation=operation,
    )


def _sendto_address(args):
    # sendto(data, address) or sendto(data, flags, address)
    return args[-1] if len(args) in (2, 3) else None


def _sendmsg_address(args, kwargs):
    # sendmsg(buffers[, ancdata[, flags[, address]]])
    if "address" in kwargs:
        return kwargs["address"]
    return args[3] if len(args) >= 4 else None


# ----------------------------------------------------------------------------- guarded methods


def _guarded_connect(self, address):
    _refuse(self, address, "connect")
    return _CSocket.connect(self, address)


def _guarded_connect_ex(self, address):
    _refuse(self, address, "connect_ex")
    return _CSocket.connect_ex(self, address)


def _guarded_sendto(self, *args):
    address = _sendto_address(args)
    if address is not None:
        _refuse(self, address, "sendto")
    return _CSocket.sendto(self, *args)


def _guarded_sendmsg(self, *args, **kwargs):
    address = _sendmsg_address(args, kwargs)
    if address is not None:
        _refuse(self, address, "sendmsg")
    return _CSocket.sendmsg(self, *args, **kwargs)


_GUARDS = {
    "connect": _guarded_connect,
    "connect_ex": _guarded_connect_ex,
    "sendto": _guarded_sendto,
    "sendmsg": _guarded_sendmsg,
}
_GUARDS = {name: guard for name, guard in _GUARDS.items() if hasattr(_CSocket, name)}


class _CSocketMeta(type):
    """Keeps ``isinstance(s, _socket.socket)`` true for every C socket while the swap is on."""

    def __instancecheck__(cls, instance):
        return isinstance(instance, _CSocket)

    def __subclasscheck__(cls, subclass):
        return issubclass(subclass, _CSocket)


class _GuardedCSocket(_CSocket, metaclass=_CSocketMeta):
    """``_socket.socket`` with the guarded methods (installed as ``_socket.socket``)."""

    __slots__ = ()
    _rlhf_unguarded = _CSocket


for _name, _guard in _GUARDS.items():
    setattr(_GuardedCSocket, _name, _guard)


# ----------------------------------------------------------------------------- install

# Every public name of the C socket type: the guarded subclass stands in for each while installed.
_C_TYPE_NAMES = ((_socket, "socket"), (_socket, "SocketType"), (socket, "SocketType"))


def install() -> None:
    """Block all non-loopback connections in this process (idempotent)."""
    for name, guard in _GUARDS.items():
        setattr(socket.socket, name, guard)
    for module, attribute in _C_TYPE_NAMES:
        if getattr(module, attribute, None) is _CSocket:
            setattr(module, attribute, _GuardedCSocket)


def uninstall() -> None:
    """Restore the unguarded socket classes."""
    for name, guard in _GUARDS.items():
        if vars(socket.socket).get(name) is guard:
            delattr(socket.socket, name)  # back to the method inherited from the C type
    for module, attribute in _C_TYPE_NAMES:
        if getattr(module, attribute, None) is _GuardedCSocket:
            setattr(module, attribute, _CSocket)


def is_installed() -> bool:
    return socket.socket.connect is _guarded_connect


def install_if_requested() -> None:
    if os.environ.get(ENV_VAR, "") not in ("", "0"):
        install()

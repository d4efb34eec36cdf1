"""The network guard (``core.netguard``): every way to name a peer is covered, loopback stays open.

``tests/conftest.py`` installs the guard for every test.  Nothing here sends a packet off the
machine: blocked calls raise before the system call.
"""

import _socket
import os
import socket
import subprocess
import sys

import pytest

from rlhf_course.core import netguard

OUTSIDE = ("93.184.216.34", 443)


def _ipv6_available():
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        return True
    except OSError:
        return False


@pytest.fixture
def tcp_server():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def test_udp_sendto_is_blocked_with_host_port_and_advice():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(netguard.NetworkBlockedError) as raised:
            sock.sendto(b"query", ("8.8.8.8", 53))
        with pytest.raises(netguard.NetworkBlockedError):
            sock.sendto(b"query", 0, ("8.8.8.8", 53))  # the (data, flags, address) form
    finally:
        sock.close()
    message = str(raised.value)
    assert "'8.8.8.8' port 53" in message and "sendto" in message
    assert "offline" in message and "RLHF_PROFILE=full" in message and netguard.ENV_VAR in message
    assert (raised.value.host, raised.value.port) == ("8.8.8.8", 53)


def test_sendmsg_with_an_address_is_blocked():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(netguard.NetworkBlockedError, match="sendmsg"):
            sock.sendmsg([b"query"], [], 0, ("8.8.8.8", 53))
    finally:
        sock.close()


def test_udp_to_loopback_still_works():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.sendto(b"one", receiver.getsockname())
        sender.sendmsg([b"two"], [], 0, ("localhost", receiver.getsockname()[1]))
        assert {receiver.recv(16), receiver.recv(16)} == {b"one", b"two"}
    finally:
        sender.close()
        receiver.close()


def test_connect_ex_is_blocked():
    sock = socket.socket()
    try:
        with pytest.raises(netguard.NetworkBlockedError, match="connect_ex"):
            sock.connect_ex(OUTSIDE)
    finally:
        sock.close()


def test_c_level_socket_class_is_guarded_and_still_a_socket(tcp_server):
    sock = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(netguard.NetworkBlockedError, match="93.184.216.34"):
            sock.connect(OUTSIDE)
        with pytest.raises(netguard.NetworkBlockedError):
            _socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))
        sock.connect(("127.0.0.1", tcp_server))  # loopback is open at the C level too
    finally:
        sock.close()
    plain = socket.socket()
    try:  # the swap is invisible to type checks
        assert isinstance(plain, _socket.socket) and isinstance(plain, socket.SocketType)
        assert issubclass(socket.socket, _socket.socket)
    finally:
        plain.close()


def test_ssl_sockets_go_through_the_guard():
    import ssl

    context = ssl.create_default_context()
    with socket.socket() as raw, context.wrap_socket(raw, server_hostname="example.com") as wrapped:
        with pytest.raises(netguard.NetworkBlockedError):
            wrapped.connect(OUTSIDE)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "LocalHost", "localhost.", "127.0.0.1",
                                  "127.1", "127.0.0.2", "127.255.255.254", "2130706433", ""])
def test_loopback_spellings_are_allowed_over_ipv4(host, tcp_server):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect((host, tcp_server))
    except netguard.NetworkBlockedError:
        pytest.fail(f"{host!r} is loopback but was blocked")
    except OSError:
        pass  # refused (nothing listens on 127.0.0.2) or unresolvable here: the OS's answer, not the guard's
    finally:
        sock.close()


@pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 sockets on this machine")
@pytest.mark.parametrize("host", ["::1", "0:0:0:0:0:0:0:1", "0000:0000::0001", "::ffff:127.0.0.1",
                                  "::FFFF:7f00:1", "localhost"])
def test_loopback_spellings_are_allowed_over_ipv6(host):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.sendto(b"x", (host, 9, 0, 0))
    except netguard.NetworkBlockedError:
        pytest.fail(f"{host!r} is loopback but was blocked")
    except OSError:
        pass
    finally:
        sock.close()


@pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 sockets on this machine")
@pytest.mark.parametrize("host", ["2001:db8::1", "::ffff:8.8.8.8", "2606:2800:220:1::"])
def test_outside_ipv6_is_blocked(host):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        with pytest.raises(netguard.NetworkBlockedError, match="port 443"):
            sock.connect((host, 443, 0, 0))
    finally:
        sock.close()


@pytest.mark.parametrize("host", ["8.8.8.8", "example.com", "localhost.example.com", "127.0.0.1.nip.io",
                                  "<broadcast>", "::ffff:8.8.8.8", "2001:db8::1", "128.0.0.1"])
def test_non_loopback_hosts_are_not_loopback(host):
    assert not netguard.is_loopback_host(host)


def test_unix_sockets_are_allowed(tmp_path):
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no Unix sockets")
    path = str(tmp_path / "guard.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sender.sendto(b"hi", path)
        sender.connect(path)
        sender.send(b"there")
        assert receiver.recv(8) == b"hi" and receiver.recv(8) == b"there"
    finally:
        sender.close()
        receiver.close()


def test_uninstall_restores_the_plain_socket_classes():
    assert netguard.is_installed()
    original = netguard._CSocket
    try:
        netguard.uninstall()
        assert not netguard.is_installed()
        assert _socket.socket is original and socket.SocketType is original
        assert "connect" not in vars(socket.socket)  # back to the inherited C method
    finally:
        netguard.install()
    assert netguard.is_installed() and _socket.socket is not original


@pytest.mark.parametrize("value, expected", [("1", "True"), ("", "False")])
def test_import_installs_the_guard_only_when_asked(value, expected):
    env = {k: v for k, v in os.environ.items() if k != netguard.ENV_VAR}
    if value:
        env[netguard.ENV_VAR] = value
    code = "import rlhf_course; from rlhf_course.core import netguard; print(netguard.is_installed())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == expected

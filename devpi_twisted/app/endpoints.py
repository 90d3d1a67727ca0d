"""
The C{reuseport:} server endpoint: TCP with C{SO_REUSEPORT}, so several
processes (a main server and its C{--requests-only} workers) can listen on
one port and the kernel spreads the connections among them::

    twistd -n devpi --listen reuseport:3141:interface=127.0.0.1
    twistd -n devpi --requests-only --listen reuseport:3141:interface=127.0.0.1

Arguments are those of C{tcp:}: C{PORT[:interface=ADDRESS][:backlog=N]}; an
interface with a colon (escaped as C{\\:}) listens on IPv6.  With those of
C{ssl:} as well (C{:privateKey=KEY.pem[:certKey=CERT.pem][:extraCertChain=
CHAIN.pem][:dhParameters=DH.pem]}) it serves TLS, as C{ssl:} would: that is
what C{--workers} makes of an C{ssl:} listener.  (A C{tls:} directory
listener takes C{:reuseport=yes} instead, L{devpi_twisted.app.tlsdir}.)
Linux and the BSDs have C{SO_REUSEPORT}; elsewhere C{listen} fails saying so.
With systemd, socket activation (C{systemd:domain=INET:index=0}) shares one
socket instead.

Also here: what C{twistd devpi} says, in one line, about a C{--listen} it
cannot use (L{listenSyntaxError}, L{bindProblem}), before it touches the
server directory.
"""

import errno
import re
import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import _parse, _parseSSL, wrapServerTLS
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

from devpi_twisted.app.tlsdir import tlsDirectoryParser, yesOrNo


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """Listens on a TCP port opened with C{SO_REUSEPORT}."""

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 50) -> None:
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog

    def listen(self, protocolFactory: Any) -> Deferred[Any]:
        if not hasattr(socket, "SO_REUSEPORT"):
            return fail(OSError("SO_REUSEPORT is not available on this system"))
        family = socket.AF_INET6 if ":" in self._interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
            # adoptStreamPort duplicates the descriptor; ours is closed below.
            return succeed(self._reactor.adoptStreamPort(sock.fileno(), family, protocolFactory))
        except OSError as e:
            return fail(e)
        finally:
            sock.close()


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    """
    C{reuseport:PORT[:interface=ADDRESS][:backlog=N]}, and with
    C{:privateKey=KEY.pem} (and C{ssl:}'s other arguments) TLS over it.
    """

    prefix = "reuseport"

    def parseStreamServer(self, reactor: Any, port: str, interface: str = "", backlog: str = "50",
                          privateKey: str | None = None, certKey: str | None = None,
                          extraCertChain: str | None = None, dhParameters: str | None = None) -> IStreamServerEndpoint:
        listening = ReusePortEndpoint(reactor, int(port), interface, int(backlog))
        if privateKey is None:
            if certKey is not None or extraCertChain is not None or dhParameters is not None:
                raise ValueError("TLS needs privateKey=KEY.pem")
            return listening
        # Twisted's own reading of ssl:'s files, so both mean the same.
        (_, _, contextFactory), _ = _parseSSL(None, port, privateKey, certKey, extraCertChain=extraCertChain,
                                              dhParameters=dhParameters)
        return wrapServerTLS(contextFactory, listening, clock=reactor)


reusePortParser = ReusePortParser()


ENDPOINT_SYNTAX = (
    "an endpoint is TYPE:ARGUMENTS, e.g. tcp:3141:interface=127.0.0.1 (this machine only), tcp:3141 "
    "(every interface), ssl:443:privateKey=key.pem:certKey=cert.pem, tls:/etc/devpi-twisted/tls:port=443 "
    "or systemd:domain=INET:index=0"
)
_TCP_LIKE = ("tcp", "tcp6", "ssl", "reuseport")
_HOST_PORT = re.compile(r"^\[?([0-9A-Za-z.:%-]*?)\]?:(\d{1,5})$")


def _parts(description: str) -> tuple[list[str], dict[str, str]]:
    """The arguments of an endpoint string, split by Twisted's own parser (C{serverFromString}'s)."""
    args, kwargs = _parse(description)
    return list(args), dict(kwargs)


def endpointDescription(description: str) -> str:
    """
    The endpoint string to give Twisted for a C{--listen}: C{tls:} is served
    by our C{tlsdir:} plugin (L{devpi_twisted.app.tlsdir}), since Twisted's
    own C{tls:} plugin would be found before any other of that prefix.
    """
    kind, colon, rest = description.partition(":")
    return f"{tlsDirectoryParser.prefix}:{rest}" if colon and kind.lower() == "tls" else description


def listenSyntaxError(description: str, error: Exception) -> str:
    """
    One line on a C{--listen} that Twisted could not parse: what is wrong,
    the endpoint syntax, and the endpoint the user most likely meant.
    """
    if description.isdigit():
        return (f"--listen {description!r} is a port without an endpoint type: write "
                f"tcp:{description}:interface=127.0.0.1 (this machine only) or tcp:{description} (every interface)")
    hostPort = _HOST_PORT.match(description)
    host = hostPort.group(1) if hostPort else ""
    if host == "localhost" or "." in host or ":" in host:  # not a misspelt type like http:3142
        port = hostPort.group(2)
        interface = "127.0.0.1" if host == "localhost" else host.replace(":", "\\:")
        return (f"--listen {description!r} is an address, not an endpoint: write "
                f"tcp:{port}:interface={interface}" + (" (a colon in the address escaped as \\:)" if ":" in host else ""))
    args, _ = _parts(description)
    kind = args[0] if args else ""
    unknown = re.search(r"unexpected keyword argument '([^']+)'", str(error))
    if unknown and kind in _TCP_LIKE:
        return (f"--listen {description!r}: {kind}: has no parameter {unknown.group(1)!r}; it takes "
                f"PORT[:interface=ADDRESS][:backlog=N]"
                + (":privateKey=KEY.pem:certKey=CERT.pem" if kind == "ssl" else "")
                + ("[:privateKey=KEY.pem:certKey=CERT.pem]" if kind == "reuseport" else "")
                + f", e.g. {kind}:3141:interface=127.0.0.1" + (":privateKey=key.pem:certKey=cert.pem" if kind == "ssl" else ""))
    if unknown and kind == "tls":
        return (f"--listen {description!r}: tls: has no parameter {unknown.group(1)!r}; it takes "
                "DIRECTORY[:port=443][:interface=ADDRESS][:backlog=N], e.g. tls:/etc/devpi-twisted/tls:port=443")
    if isinstance(error, OSError) and error.filename:
        reason = f"{error.strerror}: {error.filename}"
    elif "Unknown endpoint type" in str(error):
        reason = f"unknown endpoint type {kind!r}"
    elif "invalid literal for int()" in str(error):
        reason = "the port (and backlog) must be numbers"
    else:
        reason = str(error) or error.__class__.__name__
    return f"--listen {description!r}: {reason}; {ENDPOINT_SYNTAX}"


def listenAddress(description: str) -> tuple[str, int] | None:
    """
    The interface and TCP port a C{--listen} binds, or C{None} for the types
    that bind none themselves (C{systemd:}, C{unix:}).
    """
    args, kwargs = _parts(description)
    kind = args[0] if args else ""
    if kind in _TCP_LIKE:
        port = kwargs.get("port") or (args[1] if len(args) > 1 else "")
        interface = kwargs.get("interface", "")
    elif kind in ("tls", tlsDirectoryParser.prefix):
        port, interface = kwargs.get("port", "443"), kwargs.get("interface", "::")
    else:
        return None
    return interface, int(port)


def _withPort(description: str, port: int, new: int) -> str:
    """C{description} listening on C{new} instead: the user's endpoint, for an example."""
    return re.sub(rf"(?<=[:=]){port}(?=:|$)", str(new), description, count=1)


def sharesPort(description: str) -> bool:
    """Whether the listener binds with C{SO_REUSEPORT} (C{reuseport:}, C{tls:...:reuseport=yes})."""
    args, kwargs = _parts(description)
    kind = args[0].lower() if args else ""
    if kind in ("tls", tlsDirectoryParser.prefix):
        try:
            return yesOrNo("reuseport", kwargs.get("reuseport", "no"))
        except ValueError:
            return False
    return kind == "reuseport"


def bindProblem(description: str) -> str | None:
    """
    Why C{--listen description} could not listen now (port in use, a
    privileged port, an address this machine does not have), in one line
    that says how to choose another; C{None} when it can.

    A throwaway socket is bound with the options Twisted's (or our
    C{reuseport:}) listening socket uses, so only a real conflict counts.
    So a C{reuseport:} description passes while processes of this user
    listen there with C{SO_REUSEPORT}: right for a C{--workers} child
    joining its main, which therefore checks the user's own C{--listen}
    (C{tcp:}, C{tls:}), not its rewriting, to find another server there.
    """
    address = listenAddress(description)
    if address is None or address[1] == 0:
        return None
    interface, port = address
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    host = interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sharesPort(description) and hasattr(socket, "SO_REUSEPORT"):
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"cannot listen on {where}: the port is in use (another server?); choose another "
                        f"port, e.g. --listen {_withPort(description, port, port + 1 if port < 65535 else 3141)}")
            if e.errno == errno.EACCES:
                return (f"cannot listen on {where}: ports below 1024 need privileges; choose a higher "
                        f"port, e.g. --listen {_withPort(description, port, 8000 + port)}")
            if e.errno == errno.EADDRNOTAVAIL:
                return (f"cannot listen on {where}: {host} is not an address of this machine; e.g. "
                        f"--listen tcp:{port}:interface=127.0.0.1")
            return f"cannot listen on {where}: {e.strerror}"
    return None

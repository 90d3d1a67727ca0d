"""
The C{reuseport:} server endpoint: TCP with C{SO_REUSEPORT}, so several
processes (a main server and its C{--requests-only} workers) can listen on
one port and the kernel spreads the connections among them::

    twistd -n devpi --listen reuseport:3141:interface=127.0.0.1
    twistd -n devpi --requests-only --listen reuseport:3141:interface=127.0.0.1

Arguments are those of C{tcp:}: C{PORT[:interface=ADDRESS][:backlog=N]}; an
interface with a colon (escaped as C{\\:}) listens on IPv6.  Linux and the
BSDs have C{SO_REUSEPORT}; elsewhere C{listen} fails saying so.  With systemd,
socket activation (C{systemd:domain=INET:index=0}) shares one socket instead.
"""

import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


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
    """C{reuseport:PORT[:interface=ADDRESS][:backlog=N]}."""

    prefix = "reuseport"

    def parseStreamServer(self, reactor: Any, port: str, interface: str = "", backlog: str = "50") -> ReusePortEndpoint:
        return ReusePortEndpoint(reactor, int(port), interface, int(backlog))


reusePortParser = ReusePortParser()

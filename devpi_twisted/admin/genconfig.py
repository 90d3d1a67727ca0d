# -*- test-case-name: tests.test_ops -*-
"""
C{devpi-twisted gen-config}: systemd units for this installation.

It writes C{devpi-twisted.service} (and C{devpi-twisted.socket} when the
server is to be socket-activated) with the paths of this virtualenv, the
server directory, the user and the listen addresses given, hardened the same
way as the example units in C{systemd/} (which are this module's output for
the defaults).  It does not install anything; it prints the steps.
"""

import os
import re
import sys
from dataclasses import dataclass, field
from typing import TextIO

from twisted.python import usage

from devpi_twisted.config import DEFAULT_LISTEN
from devpi_twisted.app.options import TypedOptions

SERVICE = "devpi-twisted.service"
SOCKET = "devpi-twisted.socket"
DEFAULT_VENV = "/opt/devpi-twisted/venv"
DEFAULT_UNIT_SERVERDIR = "/var/lib/devpi-twisted"
_BARE = re.compile(r"^[A-Za-z0-9_./:=@,+-]+$")
_PORT = re.compile(r"^\d{1,5}$")
_IPV4 = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})$")
_IPV6 = re.compile(r"^\[([0-9A-Fa-f:.%a-z]*)\]:(\d{1,5})$")


def quoteArgument(argument: str) -> str:
    """
    One C{ExecStart=} argument: C{%} and C{$} doubled (systemd expands
    specifiers and variables), quoted with C escapes when it has anything but
    plain characters (an endpoint's C{\\:}, spaces).
    """
    text = argument.replace("%", "%%").replace("$", "$$")
    if _BARE.match(argument):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def socketDomain(address: str) -> tuple[str, str]:
    """
    The C{ListenStream=} value and the Twisted C{systemd:} domain for an
    address: C{3141} and C{[::]:3141} are INET6 (dual-stack), C{127.0.0.1:3141}
    is INET.
    """
    if _PORT.match(address):
        return f"[::]:{address}", "INET6"
    if _IPV4.match(address):
        return address, "INET"
    if _IPV6.match(address):
        return address, "INET6"
    raise ValueError(f"{address!r} is not PORT, IPV4:PORT or [IPV6]:PORT")


@dataclass
class UnitSettings:
    """What the units are made from."""

    serverdir: str = DEFAULT_UNIT_SERVERDIR
    listen: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    user: str = "devpi"
    group: str | None = None
    venv: str = DEFAULT_VENV
    jsonLog: bool = False
    shutdownGrace: float = 30.0
    serverArgs: list[str] = field(default_factory=list)

    def listens(self) -> list[str]:
        """
        The --listen values of the server: the given ones, and, unless some
        are C{systemd:} already, one C{systemd:} listen per socket.
        """
        result = list(self.listen)
        if not any(each.startswith("systemd:") for each in result):
            for index, address in enumerate(self.sockets):
                _, domain = socketDomain(address)
                result.append(f"systemd:domain={domain}:index={index}")
        if not result:
            result.append(DEFAULT_LISTEN)
        return result


def _check(settings: UnitSettings) -> None:
    for address in settings.sockets:
        socketDomain(address)
    for each in settings.listen:
        if not each.startswith("systemd:"):
            continue
        index = re.search(r"(?:^|:)index=(\d+)(?::|$)", each)
        if index is None:
            raise ValueError(f"{each!r}: gen-config needs index=N in a systemd: --listen")
        if int(index.group(1)) >= len(settings.sockets):
            raise ValueError(f"{each!r} uses socket {index.group(1)}: give a --socket ADDRESS for each "
                             "systemd: listen (the .socket unit's ListenStream, in index order)")
    for path, what in ((settings.serverdir, "--serverdir"), (settings.venv, "--venv")):
        if not os.path.isabs(path):
            raise ValueError(f"{what} must be an absolute path, not {path!r}")
    if not re.match(r"^[a-z_][a-z0-9_-]*$", settings.user) or \
            (settings.group and not re.match(r"^[a-z_][a-z0-9_-]*$", settings.group)):
        raise ValueError("--user and --group must be plain system account names")


def _underHome(*paths: str) -> bool:
    return any(p == d or p.startswith(d + "/") for p in paths for d in ("/home", "/root", "/run/user"))


def underTmp(settings: UnitSettings) -> list[str]:
    """
    The server directory and venv that are under C{/tmp} or C{/var/tmp}:
    with C{PrivateTmp=yes} the service would see an empty private one
    instead (no twistd to start, the data kept where nobody looks).
    """
    paths = (settings.serverdir.rstrip("/") or "/", settings.venv)
    return [p for p in paths if any(p == d or p.startswith(d + "/") for d in ("/tmp", "/var/tmp"))]


def serviceUnit(settings: UnitSettings) -> str:
    _check(settings)
    serverdir = settings.serverdir.rstrip("/") or "/"
    group = settings.group or settings.user
    twistd = os.path.join(settings.venv, "bin", "twistd")
    logging = ["--logger=devpi_twisted.app.logs.jsonStdout"] if settings.jsonLog else ["--logfile=-"]
    command = [twistd, "--nodaemon", "--pidfile=", *logging, "devpi", f"--serverdir={serverdir}"]
    command += [f"--listen={each}" for each in settings.listens()]
    command += list(settings.serverArgs)
    lines = [quoteArgument(command[0])]
    # One option per continuation line, devpi's options after "devpi".
    lines += [quoteArgument(arg) for arg in command[1:]]
    execStart = " \\\n    ".join(lines)
    stateDirectory = []
    if serverdir.startswith("/var/lib/") and serverdir.count("/") == 3:
        stateDirectory = [f"StateDirectory={serverdir[len('/var/lib/'):]}", "StateDirectoryMode=0700"]
    socket = bool(settings.sockets)
    unit = [
        "# devpi-twisted as a hardened systemd service (written by devpi-twisted gen-config).",
        "#",
        "# Install (as root): create the user, put the unit in place, start it:",
        f"#   useradd --system --home-dir {serverdir} --shell /usr/sbin/nologin {settings.user}",
        f"#   cp {SERVICE}{' ' + SOCKET if socket else ''} /etc/systemd/system/",
        f"#   systemctl daemon-reload && systemctl enable --now {SOCKET if socket else SERVICE}",
        "# The first start initialises the server directory and writes root's generated",
        f"# password to the journal (journalctl -u devpi-twisted).  Stop: systemctl stop {SERVICE}",
        f"# (SIGTERM: listeners close, requests in flight get {settings.shutdownGrace:g}s to finish).",
        "",
        "[Unit]",
        "Description=devpi-twisted Python package index",
        "Documentation=https://pypi.org/project/devpi-twisted/",
        "After=network-online.target",
        "Wants=network-online.target",
    ]
    if socket:
        unit += [f"Requires={SOCKET}", f"After={SOCKET}"]
    unit += [
        "",
        "[Service]",
        "Type=exec",
        f"User={settings.user}",
        f"Group={group}",
        *stateDirectory,
        f"WorkingDirectory={serverdir}",
        f"ExecStart={execStart}",
        "Restart=on-failure",
        "RestartSec=5",
        f"TimeoutStopSec={int(settings.shutdownGrace) + 15}",
        "LimitNOFILE=65536",
        "",
        "# Bind ports below 1024 (e.g. --listen=ssl:443:...) without running as root.",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ProtectHome={'read-only' if _underHome(serverdir, settings.venv) else 'yes'}",
        *(["# PrivateTmp=no: " + " and ".join(underTmp(settings)) + " would be hidden by a private /tmp",
           "PrivateTmp=no"] if underTmp(settings) else ["PrivateTmp=yes"]),
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "UMask=0077",
        f"ReadWritePaths={serverdir}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(unit)


def socketUnit(settings: UnitSettings) -> str | None:
    """The C{.socket} unit, or C{None} without C{--socket}."""
    _check(settings)
    if not settings.sockets:
        return None
    streams = [socketDomain(address)[0] for address in settings.sockets]
    unit = [
        "# The listening sockets of devpi-twisted, for socket activation (written by",
        "# devpi-twisted gen-config).  systemd binds them (ports below 1024 included) and",
        f"# starts {SERVICE} at the first connection.  The service must take them with",
        "# --listen=systemd:domain=INET6:index=N (INET for an IPv4 address), one per",
        "# ListenStream, in this order: gen-config --socket ADDRESS writes both units so.",
        "# Enable this unit instead of the service:",
        f"#   systemctl enable --now {SOCKET}",
        "",
        "[Unit]",
        "Description=devpi-twisted Python package index (listening sockets)",
        "",
        "[Socket]",
        *[f"ListenStream={stream}" for stream in streams],
    ]
    if any(stream.startswith("[::]") for stream in streams):
        unit.append("BindIPv6Only=both")
    unit += [
        "NoDelay=yes",
        "Backlog=1024",
        "",
        "[Install]",
        "WantedBy=sockets.target",
        "",
    ]
    return "\n".join(unit)


class GenConfigOptions(TypedOptions):
    synopsis = ("[--serverdir DIR] [--listen ENDPOINT]... [--socket ADDRESS]... [--user USER] "
                "[--venv PATH] [--json-log] [--out DIR] [-- SERVER-OPTION...]")
    longdesc = (
        "Write systemd units for this installation: devpi-twisted.service, and devpi-twisted.socket "
        "for socket activation when --socket is given (the service then gets a matching "
        "--listen=systemd:domain=...:index=N for each, unless --listen gives systemd: listens itself). Arguments after -- are added to the server's "
        "command line (e.g. -- --outside-url https://pypi.example.com)."
    )
    optParameters = [
        ["serverdir", None, DEFAULT_UNIT_SERVERDIR, "The server directory (under /var/lib: a StateDirectory)."],
        ["user", None, "devpi", "The system user the server runs as."],
        ["group", None, None, "Its group [default: the user's name]."],
        ["venv", None, sys.prefix, "The virtualenv devpi-twisted is installed in [default: this one]."],
        ["out", None, "gen-config", "The directory to write the units to."],
        ["shutdown-grace", None, 30.0, "The server's --shutdown-grace (sets TimeoutStopSec).", float],
    ]
    optFlags = [["json-log", None, "Log JSON lines to the journal instead of text."]]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["socket"] = []

    def opt_listen(self, endpoint: str) -> None:
        """A Twisted endpoint for the server, repeatable [default: tcp:3141:interface=127.0.0.1]."""
        self["listen"].append(endpoint)

    def opt_socket(self, address: str) -> None:
        """Socket activation: a ListenStream on PORT, IPV4:PORT or [IPV6]:PORT, repeatable."""
        self["socket"].append(address)

    def parseArgs(self, *serverArgs: str) -> None:
        self["server-args"] = list(serverArgs)

    def postOptions(self) -> None:
        try:
            _check(self.settings())
        except ValueError as e:
            raise usage.UsageError(str(e))

    def settings(self) -> UnitSettings:
        return UnitSettings(
            serverdir=self["serverdir"], listen=list(self["listen"]), sockets=list(self["socket"]),
            user=self["user"], group=self["group"], venv=os.path.abspath(self["venv"]),
            jsonLog=bool(self["json-log"]), shutdownGrace=self["shutdown-grace"],
            serverArgs=list(self.get("server-args", [])),
        )


def genConfig(options: GenConfigOptions, out: TextIO) -> list[str]:
    """Write the units; return their paths."""
    settings = options.settings()
    units = {SERVICE: serviceUnit(settings), SOCKET: socketUnit(settings)}
    os.makedirs(options["out"], exist_ok=True)
    written = []
    for name, text in units.items():
        if text is None:
            continue
        path = os.path.join(options["out"], name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    twistd = os.path.join(settings.venv, "bin", "twistd")
    out.write(f"devpi-twisted: wrote {', '.join(written)}\n")
    if not os.access(twistd, os.X_OK):
        out.write(f"devpi-twisted: warning: {twistd} does not exist (yet); install devpi-twisted into {settings.venv}\n")
    for path in underTmp(settings):
        out.write(f"devpi-twisted: warning: {path} is under a temporary directory, which the system may empty "
                  "(at boot or when it is old); the unit has PrivateTmp=no so the service can see it\n")
    socket = bool(settings.sockets)
    out.write(
        "Install them (as root):\n"
        f"  useradd --system --home-dir {settings.serverdir} --shell /usr/sbin/nologin {settings.user}\n"
        f"  cp {' '.join(written)} /etc/systemd/system/\n"
        "  systemctl daemon-reload\n"
        f"  systemctl enable --now {SOCKET if socket else SERVICE}\n"
        "  journalctl -u devpi-twisted    # root's generated password on the first start\n"
    )
    return written

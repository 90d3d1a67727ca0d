# -*- test-case-name: tests.test_ops -*-
"""
The C{tls:} listener: server certificates from a directory of PEM files,
chosen by SNI, and picked up again when they change.

Twisted's own C{tls:DIRECTORY} endpoint (26.4) reads the directory once and
only reloads it for an unknown name when the directory was empty at start;
renewed certificates for a known name are never re-read.  This replacement,
an endpoint plugin (L{TLSDirectoryParser}), keeps Twisted's string syntax
(C{tls:DIR:port=443:interface=:::backlog=50}) and its parts
(L{wrapServerTLS}, L{TCP6ServerEndpoint}, L{CertificateOptions} with
C{contextForServerName}), and

  - re-reads the directory when a C{.pem} file under it changed (size,
    modification time or target of a symlink, as certbot's C{live/} links
    change on renewal), checked at most every C{checkInterval} seconds when a
    connection arrives, and for a name it has no certificate for, at most
    every C{unknownInterval} seconds;
  - pairs keys and certificates by public key, adds the intermediates found
    in the directory as the chain, and for a name with several certificates
    serves the one that expires last;
  - keeps serving the certificates it has when a reload fails (a
    half-written file), and logs why.

Protocols and ciphers are L{CertificateOptions}' defaults: TLS 1.2 and 1.3,
forward-secret AEAD ciphers.
"""

import os
import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL.SSL import Connection, Context
from twisted.internet.endpoints import TCP6ServerEndpoint, wrapServerTLS
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

log = Logger()

_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


class NoCertificates(ValueError):
    """The directory holds no usable key and certificate pair."""


def _readPEMs(root: str) -> tuple[list[Any], list[Any]]:
    """Every private key and certificate in the C{.pem} files below C{root}."""
    keys: list[Any] = []
    certificates: list[Any] = []
    for directory, _, names in os.walk(root, followlinks=True):
        for name in sorted(names):
            if not name.endswith(".pem"):
                continue
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
            for match in _BLOCK.finditer(data):
                kind, block = match.group(1), match.group(0)
                if kind == b"CERTIFICATE":
                    certificates.append(x509.load_pem_x509_certificate(block))
                elif kind.endswith(b"PRIVATE KEY"):
                    keys.append(serialization.load_pem_private_key(block, password=None))
    return keys, certificates


def _publicBytes(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _names(certificate: Any) -> list[str]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in extension.value.get_values_for_type(x509.DNSName)]


@implementer(IOpenSSLServerConnectionCreator)
class CertificateDirectory:
    """
    @param path: the directory (searched recursively, symlinks followed).
    @param clock: for the checking intervals.
    @raise NoCertificates: at start, when nothing can be served.
    """

    def __init__(self, path: str, clock: IReactorTime, checkInterval: float = 60.0,
                 unknownInterval: float = 5.0) -> None:
        self.path = path
        self._clock = clock
        self._checkInterval = checkInterval
        self._unknownInterval = unknownInterval
        self._byName: dict[str, CertificateOptions] = {}
        self._default: CertificateOptions | None = None
        self._signature: Any = None
        self._lastCheck = self._lastUnknown = -1e18
        self.loads = 0
        self._load(self._scan())
        if self._default is None:
            raise NoCertificates(f"no private key with a matching certificate in .pem files under {path}")

    # what the TLS layer calls

    def serverConnectionForTLS(self, protocol: Any) -> Connection:
        now = self._clock.seconds()
        if now - self._lastCheck >= self._checkInterval:
            self._lastCheck = now
            self._reloadIfChanged()
        assert self._default is not None
        return Connection(self._default.getContext())

    def contextForName(self, name: bytes | None) -> Context | None:
        """The context for an SNI name, or C{None} to keep the default one."""
        if not name:
            return None
        text = name.decode("ascii", "replace").lower()
        options = self._find(text)
        if options is None:
            now = self._clock.seconds()
            if now - self._lastUnknown >= self._unknownInterval:
                self._lastUnknown = now
                log.info("no certificate for {name} yet; looking in {path} again", name=text, path=self.path)
                self._reloadIfChanged()
                options = self._find(text)
        if options is None:
            log.warn("no certificate for {name} in {path}", name=text, path=self.path)
            return None
        return options.getContext()

    def _find(self, name: str) -> CertificateOptions | None:
        found = self._byName.get(name)
        if found is None and "." in name:
            found = self._byName.get("*." + name.split(".", 1)[1])
        return found

    # reading the directory

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        for directory, _, names in os.walk(self.path, followlinks=True):
            for name in names:
                if name.endswith(".pem"):
                    full = os.path.join(directory, name)
                    try:
                        st = os.stat(full)
                    except OSError:
                        continue
                    entries.append((full, st.st_mtime_ns, st.st_size))
        return tuple(sorted(entries))

    def _reloadIfChanged(self) -> None:
        signature = self._scan()
        if signature == self._signature:
            return
        try:
            self._load(signature)
        except Exception as e:
            log.warn("keeping the certificates in use: reading {path} failed: {error}", path=self.path, error=e)

    def _load(self, signature: Any) -> None:
        keys, certificates = _readPEMs(self.path)
        bySubject: dict[Any, Any] = {}
        for certificate in certificates:
            bySubject.setdefault(certificate.subject, certificate)
        leaves: dict[bytes, list[Any]] = {}
        for certificate in certificates:
            leaves.setdefault(_publicBytes(certificate.public_key()), []).append(certificate)
        chosen: dict[str, tuple[Any, Any]] = {}
        for key in keys:
            for certificate in leaves.get(_publicBytes(key.public_key()), []):
                for name in _names(certificate) or [""]:
                    current = chosen.get(name)
                    if current is None or certificate.not_valid_after_utc > current[1].not_valid_after_utc:
                        chosen[name] = (key, certificate)
        options: dict[bytes, CertificateOptions] = {}
        byName: dict[str, CertificateOptions] = {}
        default: CertificateOptions | None = None
        for name in sorted(chosen):
            key, certificate = chosen[name]
            fingerprint = certificate.fingerprint(hashes.SHA256())
            if fingerprint not in options:
                options[fingerprint] = CertificateOptions(
                    privateKey=key, certificate=certificate, extraCertChain=self._chain(certificate, bySubject),
                    contextForServerName=self.contextForName,
                )
            if name:
                byName[name] = options[fingerprint]
            if default is None:
                default = options[fingerprint]
        if default is None:
            if self._default is None:
                return
            raise NoCertificates(f"no private key with a matching certificate in .pem files under {self.path}")
        self._byName, self._default, self._signature = byName, default, signature
        self.loads += 1
        log.info("TLS certificates from {path}: {names}", path=self.path, names=", ".join(sorted(byName)) or "-")

    @staticmethod
    def _chain(certificate: Any, bySubject: dict[Any, Any]) -> list[Any]:
        chain = []
        current = certificate
        while current.issuer != current.subject and current.issuer in bySubject and len(chain) < 5:
            current = bySubject[current.issuer]
            if current.issuer == current.subject:
                break  # the root: clients have it
            chain.append(current)
        return chain


@implementer(IPlugin, IStreamServerEndpointStringParser)
class TLSDirectoryParser:
    """
    C{tlsdir:DIRECTORY[:port=443][:interface=::][:backlog=50][:reuseport=yes]},
    Twisted's C{tls:} syntax and defaults over a L{CertificateDirectory}.
    Twisted ships a C{tls:} plugin of its own, which plugin lookup always
    finds first, so ours has its own prefix and C{--listen tls:...} is given
    to it by L{devpi_twisted.app.endpoints.endpointDescription}.

    C{reuseport=yes} listens with C{SO_REUSEPORT}
    (L{devpi_twisted.app.endpoints.ReusePortEndpoint}), so the processes of
    C{--workers} share the port; each reads the directory itself.
    """

    prefix = "tlsdir"

    def parseStreamServer(self, reactor: Any, path: str, port: str = "443", backlog: str = "50",
                          interface: str = "::", reuseport: str = "no") -> IStreamServerEndpoint:
        listening: IStreamServerEndpoint
        if yesOrNo("reuseport", reuseport):
            # Here, not at the top: endpoints imports this module.
            from devpi_twisted.app.endpoints import ReusePortEndpoint

            listening = ReusePortEndpoint(reactor, int(port), interface, int(backlog))
        else:
            listening = TCP6ServerEndpoint(reactor, int(port), int(backlog), interface)
        return wrapServerTLS(CertificateDirectory(path, reactor), listening, clock=reactor)


def yesOrNo(name: str, value: str) -> bool:
    """An endpoint's C{name=yes|no} argument."""
    if value.lower() in ("yes", "no"):
        return value.lower() == "yes"
    raise ValueError(f"{name} must be yes or no, not {value!r}")


tlsDirectoryParser = TLSDirectoryParser()

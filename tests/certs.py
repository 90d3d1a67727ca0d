"""
Throwaway certificate authorities for TLS tests, made with C{cryptography}.

L{CA.issue} signs a server certificate for DNS names and IP addresses;
everything is written as PEM, so the server reads it as an administrator's
files and clients trust the CA as they would a company CA (pip's C{--cert},
treq's C{trustRoot}).
"""

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Issued:
    """A server certificate and its key, as PEM."""

    certificate: bytes
    key: bytes

    def write(self, directory: str, stem: str = "server") -> tuple[str, str]:
        """Write C{stem}.crt and C{stem}.key; return their paths."""
        cert = os.path.join(directory, f"{stem}.crt")
        key = os.path.join(directory, f"{stem}.key")
        with open(cert, "wb") as f:
            f.write(self.certificate)
        with open(key, "wb") as f:
            f.write(self.key)
        return cert, key

    def writeCombined(self, path: str) -> str:
        """Key and certificate in one PEM file (what the C{tls:} endpoint reads)."""
        with open(path, "wb") as f:
            f.write(self.key + self.certificate)
        return path


class CA:
    """A self-signed certificate authority."""

    def __init__(self, name: str = "devpi-twisted test CA") -> None:
        self._key = _key()
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self._cert.public_bytes(serialization.Encoding.PEM)

    def writeCA(self, path: str) -> str:
        with open(path, "wb") as f:
            f.write(self.pem)
        return path

    def issue(self, names: list[str], addresses: list[str] = ()) -> Issued:  # type: ignore[assignment]
        """A server certificate for C{names} (DNS) and C{addresses} (IP)."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        alternatives: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        alternatives += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (names or list(addresses))[0])])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_encipherment=False, content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem(key))

"""TLS certificates and SuperNode keys for a real Flower deployment, made with ``cryptography``.

A deployment needs a certificate authority the nodes trust (``ca.crt``), a server certificate
for the SuperLink whose subject-alternative names cover the address nodes dial (``127.0.0.1`` and
``localhost`` by default, plus any ``hosts``), and one ECDSA key pair per SuperNode in OpenSSH
format, which is what ``flower-supernode --auth-supernode-private-key`` and
``flwr supernode register`` read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedbabu.errors import UserError

VALID_DAYS = 365


@dataclass(frozen=True)
class Credentials:
    """Paths of everything :func:`make_credentials` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path]

    def public_key(self, node: int) -> Path:
        return self.node_keys[node].with_suffix(".pub")


def _write(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    handle = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(handle, "wb") as out:
        out.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbabu"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_credentials(folder: Path, nodes: int, hosts: list[str] | None = None,
                     overwrite: bool = False) -> Credentials:
    """Write ``ca.crt``/``ca.key``, ``server.pem``/``server.key`` and ``keys/node-I`` (+ ``.pub``) to ``folder``."""
    if nodes < 0:
        raise UserError(f"--nodes: expected a number >= 0, got {nodes}")
    folder = Path(folder)
    keys = folder / "keys"
    node_keys = [keys / f"node-{i}" for i in range(nodes)]
    targets = [folder / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")] + node_keys
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]}: already exists; pass --overwrite to replace the credentials in {folder}")
    try:
        keys.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None

    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("fedbabu CA")).issuer_name(_name("fedbabu CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name("fedbabu superlink")).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts or [])), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(folder / "ca.key", _pem_key(ca_key), private=True)
    _write(folder / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(folder / "server.key", _pem_key(server_key), private=True)
    for path in node_keys:
        key = ec.generate_private_key(ec.SECP384R1())
        _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), private=True)
        _write(path.with_suffix(".pub"), key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH) + b"\n",
               private=False)
    return Credentials(folder / "ca.crt", folder / "server.pem", folder / "server.key", node_keys)

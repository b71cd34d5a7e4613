"""Certificates for mutual TLS, made offline (OpenFL's `fx pki` downloads step-ca, which fails offline).

    python -m security.certs make [--out DIR] [--director-host NAME_OR_IP ...] [--envoy NAME ...]
                            [--researcher NAME ...] [--force]
    python -m security.certs check [--name NAME] [--role ROLE] --cert FILE --key FILE --ca FILE

`make` writes to certs/ at the repository's root (or --out) a local CA (ca.crt, ca.key); director.crt/.key,
valid for the director's host names and addresses (localhost and 127.0.0.1 unless others are given); one
certificate per envoy whose common name is the envoy's name, which OpenFL's aggregator checks; and one per
researcher (default: one called "researcher"), for the notebook's API client and for signing experiments. Each
certificate carries its role, director, envoy or researcher, as its subject's organizational unit (OU): the
director serves its researcher API to researcher certificates only, and envoys run experiments signed by
researcher certificates only. Private keys are written with mode 0600, and existing files are kept unless
--force (or unless they lack the role they must carry). `check` prints a certificate's name and role, or tells
in one line why a node would refuse it, before the node starts: wrong CA, expired, another name or role, or a
key that does not match.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_RESEARCHERS = ("researcher",)
# certs/ at the repository's root, where make demo and the docs look for them: git-ignored, and outside workspace/,
# which travels with every experiment.
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "certs"
ROLES = ("director", "envoy", "researcher")


class CertError(ValueError):
    """A certificate that a node would refuse, with what to do about it."""


def _write(path: Path, data: bytes, private: bool) -> None:
    # Keys are created 0600 from the start, never readable by others even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _save(folder: Path, name: str, key, cert: x509.Certificate) -> None:
    _write(folder / f"{name}.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()), private=True)
    _write(folder / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _issue(common_name: str, role: str, key, ca_cert, ca_key, hosts: list[str], days: int,
           not_before=None) -> x509.Certificate:
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))


def _load_ca(folder: Path):
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    return ca_cert, ca_key


def identity(cert: x509.Certificate) -> tuple[str, str | None]:
    """A certificate's (common name, role); the role is None for a certificate made without one."""
    def first(oid):
        found = cert.subject.get_attributes_for_oid(oid)
        return found[0].value if found else None

    role = first(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return first(NameOID.COMMON_NAME) or "", role if role in ROLES else None


def _current(path: Path, role: str) -> bool:
    return path.exists() and identity(x509.load_pem_x509_certificate(path.read_bytes()))[1] == role


def make(out: Path, director_hosts=DEFAULT_HOSTS, envoys=("envoy_1", "envoy_2"), force: bool = False,
         days: int = 365, not_before=None, researchers=DEFAULT_RESEARCHERS) -> list[Path]:
    """Write the CA (unless present) and every missing node certificate; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if force or not (out / "ca.crt").exists():
        ca_key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MedMNIST federation CA")])
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=max(days, 1) + 365))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _save(out, "ca", ca_key, ca_cert)
        written += [out / "ca.crt", out / "ca.key"]
        force = True  # a new CA invalidates every certificate the old one signed
    ca_cert, ca_key = _load_ca(out)
    nodes = {"director": ("director", list(director_hosts)), **{r: ("researcher", [r]) for r in researchers},
             **{e: ("envoy", [e]) for e in envoys}}
    clash = sorted(set(researchers) & ({"director", "ca"} | set(envoys)))
    if clash:
        raise CertError(f"{', '.join(clash)}: a researcher needs a name no envoy, director or CA file has")
    for name, (role, hosts) in nodes.items():
        if force or not _current(out / f"{name}.crt", role):
            key = _key()
            _save(out, name, key, _issue(name, role, key, ca_cert, ca_key, hosts, days, not_before))
            written += [out / f"{name}.crt", out / f"{name}.key"]
    return written


def check(name: str | None, cert_path: Path, key_path: Path, ca_path: Path,
          role: str | None = None) -> x509.Certificate:
    """Raise CertError if this node's certificate would be refused; return it otherwise."""
    for path in (cert_path, key_path, ca_path):
        if not Path(path).is_file():
            raise CertError(f"{path} does not exist: run `make certs` (or python -m security.certs make) first")
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertError(f"{cert_path} was not signed by the CA in {ca_path}: every node needs certificates "
                        "from the same CA") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(f"{cert_path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: make a new one (python -m security.certs make "
                        "--force)")
    common_name, cert_role = identity(cert)
    if name is not None and common_name != name:
        raise CertError(f"{cert_path} is for {common_name!r}, not {name!r}: OpenFL refuses a node whose "
                        f"certificate names another; use {name}.crt (python -m security.certs make --envoy {name})")
    if role is not None and cert_role != role:
        raise CertError(f"{cert_path} is {_role_phrase(cert_role)}, not {_article(role)} {role}'s: make the right one "
                        "with `make certs`")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise CertError(f"{key_path} is not the key of {cert_path}")
    return cert


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _role_phrase(role: str | None) -> str:
    return f"{_article(role)} {role}'s certificate" if role else "a certificate without a role (made before roles)"


def main(argv=None) -> int:
    """Run `make` or `check`; a refused certificate prints one line and exits with status 2."""
    parser = argparse.ArgumentParser(prog="python -m security.certs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--out", default=str(DEFAULT_OUT), help=f"the folder to write to (default {DEFAULT_OUT})")
    mk.add_argument("--director-host", action="append", help="a name or address envoys use to reach the director")
    mk.add_argument("--envoy", action="append", help="an envoy's name (repeat); default envoy_1 and envoy_2")
    mk.add_argument("--researcher", action="append",
                    help="a researcher's name (repeat); default: one called 'researcher'")
    mk.add_argument("--days", type=int, default=365)
    mk.add_argument("--force", action="store_true", help="replace existing files, the CA included")
    ck = sub.add_parser("check")
    ck.add_argument("--name")
    ck.add_argument("--role", choices=ROLES)
    ck.add_argument("--cert", required=True)
    ck.add_argument("--key", required=True)
    ck.add_argument("--ca", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "make":
            hosts = args.director_host or list(DEFAULT_HOSTS)
            written = make(Path(args.out), hosts, args.envoy or ["envoy_1", "envoy_2"], args.force, args.days,
                           researchers=args.researcher or list(DEFAULT_RESEARCHERS))
            print(f"wrote {len(written)} files to {args.out}" if written else f"{args.out} is complete; kept as is")
        else:
            cert = check(args.name, Path(args.cert), Path(args.key), Path(args.ca), args.role)
            common_name, role = identity(cert)
            print(f"{args.cert}: {common_name}, {_role_phrase(role)}, valid until "
                  f"{cert.not_valid_after_utc:%Y-%m-%d} UTC")
    except CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

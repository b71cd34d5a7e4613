"""Signed experiments: the researcher signs the archive that OpenFL ships; the director and every envoy check the
signature before anything in it is unpacked or unpickled.

The archive stays a zip that OpenFL unpacks as before, with two members added under `.signature/`: the signer's
certificate (PEM) and a signature over this format's name, the experiment's name and the SHA-256 of a manifest of
every other member (its name and the SHA-256 of its content, sorted by name). So the signature covers every byte
that will be unpacked, and ties it to the experiment's name: a director cannot alter the code, add to it, or hand an
old signed archive out as another experiment. The certificate must come from the federation's CA and carry the
researcher role (certs.py); whose signature a node accepts is the node's choice (trust.py).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .certs import identity

FORMAT = b"medfl-signed-experiment-v1"
FOLDER = ".signature/"
CERTIFICATE, SIGNATURE = FOLDER + "signer.crt", FOLDER + "signature"


class Refused(Exception):
    """An archive that must not be unpacked here; the message says why, in one line."""


def members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The archive's members, refusing names that could land outside its folder or appear twice."""
    names = [info.filename for info in archive.infolist()]
    if len(names) != len(set(names)):
        raise Refused("the archive holds a name twice")
    for name in names:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or "\\" in name:
            raise Refused(f"the archive holds a path outside its folder ({name!r})")
    return archive.infolist()


def digest(archive: zipfile.ZipFile) -> bytes:
    """SHA-256 of the manifest of every member but the signature's: name and content hash, sorted by name."""
    manifest = hashlib.sha256()
    for info in sorted(members(archive), key=lambda i: i.filename):
        if info.filename.startswith(FOLDER):
            continue
        content = hashlib.sha256()
        with archive.open(info) as member:
            while chunk := member.read(1 << 20):
                content.update(chunk)
        manifest.update(f"{info.filename}\0{content.hexdigest()}\n".encode())
    return manifest.digest()


def _message(experiment_name: str, manifest: bytes) -> bytes:
    return b"\n".join((FORMAT, experiment_name.encode(), manifest.hex().encode()))


def sign(archive_path: Path, experiment_name: str, cert_path: Path, key_path: Path) -> None:
    """Add the signer's certificate and signature to the zip at archive_path, for experiment_name."""
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    with zipfile.ZipFile(archive_path) as archive:
        message = _message(experiment_name, digest(archive))
    try:
        signature = sign_bytes(key, message)
    except TypeError:
        raise ValueError(f"{key_path}: a {type(key).__name__} cannot sign experiments; use an EC, RSA or Ed25519 "
                         "key") from None
    with zipfile.ZipFile(archive_path, "a") as archive:
        archive.writestr(CERTIFICATE, Path(cert_path).read_bytes())
        archive.writestr(SIGNATURE, signature)


def sign_bytes(key, message: bytes) -> bytes:
    """A signature of message with a node's private key (EC: ECDSA-SHA256; RSA: PKCS#1 v1.5-SHA256; Ed25519);
    TypeError for another kind of key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    raise TypeError(f"a {type(key).__name__} cannot sign")


def check_signature(cert: x509.Certificate, signature: bytes, message: bytes) -> None:
    """InvalidSignature unless signature is cert's key's, over message (as sign_bytes makes it)."""
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, message)
    else:
        raise InvalidSignature


def verify(archive_path: Path, experiment_name: str, ca: x509.Certificate) -> x509.Certificate:
    """The signer's certificate, if the archive is signed for experiment_name by a researcher of this CA;
    raise Refused otherwise. Reads the archive; unpacks nothing."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            names = {info.filename for info in members(archive)}
            if not {CERTIFICATE, SIGNATURE} <= names:
                raise Refused("the archive is not signed")
            cert = x509.load_pem_x509_certificate(archive.read(CERTIFICATE))
            signature = archive.read(SIGNATURE)
            manifest = digest(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Refused(f"the archive cannot be read as a signed zip ({exc})") from None
    name, role = identity(cert)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise Refused(f"it is signed by {name!r}, whose certificate is not from this federation's CA") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Refused(f"it is signed by {name!r}, whose certificate is not valid now")
    if role != "researcher":
        raise Refused(f"it is signed by {name!r}, whose certificate is not a researcher's")
    try:
        check_signature(cert, signature, _message(experiment_name, manifest))
    except InvalidSignature:
        raise Refused(f"its signature by {name!r} does not match its content: it was altered after signing, "
                      "or signed for another experiment") from None
    return cert


def certified(pem: bytes, ca: x509.Certificate, name: str, role: str) -> x509.Certificate:
    """The PEM certificate, if this federation's CA issued it to `name` in `role` and it is valid now; Refused,
    saying which, otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise Refused("its certificate is not from this federation's CA") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Refused("its certificate is not valid now")
    if identity(cert) != (name, role):
        holder, held = identity(cert)
        raise Refused(f"its certificate is {holder!r}'s, as {held or 'no role'}, not {name!r}'s as {role}")
    return cert


@contextlib.contextmanager
def signing(cert: str | Path, key: str | Path) -> Iterator[None]:
    """Sign, for the block, every experiment FLExperiment packs, with this researcher's certificate and key."""
    from openfl.interface.interactive_api.experiment import FLExperiment

    original = FLExperiment.prepare_workspace_distribution

    def signed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sign(Path(self.arch_path), self.experiment_name, Path(cert), Path(key))

    FLExperiment.prepare_workspace_distribution = signed
    try:
        yield
    finally:
        FLExperiment.prepare_workspace_distribution = original

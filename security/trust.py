"""Whose code a node runs. An experiment is code: the director hands its archive to every envoy, which unpacks it,
unpickles it and runs it beside the node's data. Under mutual TLS:

- The director accepts an experiment only if its archive is signed (signing.py) by the researcher who submits it.
- Each envoy accepts an experiment only if its archive is signed by a researcher of the federation's CA, for that
  experiment's name, and unaltered, and if its policy admits it (policy.py: which researchers, DP-SGD, budget...).
  It checks this before any file is unpacked, then unpacks exactly the bytes it checked. It logs what it accepted
  (sender, archive SHA-256 and size), or whom it refused and why, in its log and its audit log (guard.py); a
  refusal is reported to the director (contract.REFUSED), which goes on without the envoy, and the notebook shows
  which envoy refused and why. A compromised director can thus withhold experiments, but not run its own code on
  the envoys.
Without TLS (allowed on loopback only, see plaintext.py) nobody is identified and no signature is checked; the
policy's other rules still apply.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import uuid
import zipfile
from pathlib import Path

from cryptography import x509

from openfl_adjustments.contract import HELD, REFUSED
from openfl_adjustments.patching import replace

from . import guard
from .certs import identity
from .signing import SIGNATURE, Refused, verify

logger = logging.getLogger("openfl_adjustments")
CHUNK = 2 * 1024 * 1024  # as OpenFL's director streams archives


_CA: list[x509.Certificate] = []  # this envoy's, once configured under TLS: whose researchers may sign


def configure(envoy: str, ca_path: Path | None, config_path: Path) -> None:
    """Set this envoy's rules from its CA (None: plaintext) and its config's policy (guard.configure_envoy; a
    policy.PolicyError says what to change in the config)."""
    rules = guard.configure_envoy(envoy, Path(config_path), tls=ca_path is not None)
    if ca_path is None:
        return
    _CA[:] = [x509.load_pem_x509_certificate(Path(ca_path).read_bytes())]
    who = ", ".join(rules.researchers) if rules.researchers is not None else "every researcher of its CA"
    print(f"envoy {envoy} runs experiments signed by: {who}", file=sys.stderr, flush=True)


def _received(stream) -> tuple[Path, str, int]:
    """Write an experiment's archive as the director streams it to a file beside the envoy's config; return the file,
    its SHA-256 (hashed as it arrives) and its size."""
    path, content, size = Path.cwd() / f".incoming-{uuid.uuid4()}", hashlib.sha256(), 0
    with open(path, "wb") as out:
        for chunk in stream:
            if chunk.size != len(chunk.npbytes):
                path.unlink()
                raise Refused("the archive arrived broken")
            out.write(chunk.npbytes)
            content.update(chunk.npbytes)
            size += len(chunk.npbytes)
    return path, content.hexdigest(), size


def checking_wait(wait_experiment):
    """ShardDirectorClient.wait_experiment that fetches each experiment's archive and returns only an experiment
    this envoy accepts; a refused one is reported to the director and deleted unopened."""

    def wrapper(self):
        while True:
            experiment = wait_experiment(self)
            if not guard.watching():  # not an envoy started by python -m node
                return experiment
            archive, sha256, size = _received(self.get_experiment_data(experiment))
            sender = verified = problem = certificate = None
            if _CA:
                try:
                    signer = verify(archive, experiment, _CA[0])
                    sender, verified = identity(signer)[0], True
                    with zipfile.ZipFile(archive) as zipped:
                        signature = zipped.read(SIGNATURE).hex()
                    certificate = (f"{signer.subject.rfc4514_string()}, issued by {signer.issuer.rfc4514_string()}, "
                                   f"serial {signer.serial_number:x}; signature {signature[:32]}...")
                except Refused as why:
                    verified, problem = False, str(why)
            try:
                held = guard.admit(experiment, archive, sha256, sender, verified, problem, certificate)
                if held is not None:  # approval: manual, and its operator has not approved its code yet
                    line = guard.held_line(experiment, held)
                    logger.warning("%s", line)
                    self.set_experiment_failed(experiment, error_description=f"{HELD}{line}")
                    guard.wait_for_review(experiment, held)
            except Refused as why:
                archive.unlink()
                logger.error("Refused experiment %s, unpacking nothing of it: %s", experiment, why)
                self.set_experiment_failed(experiment, error_description=f"{REFUSED}{why}")
                continue
            logger.info("Accepted experiment %s from %s: archive SHA-256 %s, %d bytes", experiment,
                        sender or "an unidentified researcher (plaintext)", sha256, size)
            self.checked_archives = {**getattr(self, "checked_archives", {}), experiment: archive}
            return experiment

    return wrapper


def serving_checked(get_experiment_data):
    """ShardDirectorClient.get_experiment_data that hands the envoy the very archive it checked."""
    from openfl.protocols import director_pb2

    def wrapper(self, experiment_name):
        archive = getattr(self, "checked_archives", {}).pop(experiment_name, None)
        if archive is None:
            return get_experiment_data(self, experiment_name)

        def chunks():
            try:
                with open(archive, "rb") as source:
                    while data := source.read(CHUNK):
                        yield director_pb2.ExperimentData(size=len(data), npbytes=data)
            finally:
                archive.unlink(missing_ok=True)

        return chunks()

    return wrapper


def signed_by_sender(set_new_experiment):
    """Director.set_new_experiment that, under TLS, refuses an archive not signed by the researcher submitting it."""

    async def wrapper(self, *, experiment_name, sender_name, experiment_archive_path, **kwargs):
        if self.tls:
            ca = x509.load_pem_x509_certificate(Path(self.root_certificate).read_bytes())
            try:
                signer, _ = identity(verify(Path(experiment_archive_path), experiment_name, ca))
                if signer != sender_name:
                    raise Refused(f"it is signed by {signer!r}, but {sender_name!r} submits it")
            except Refused as why:
                Path(experiment_archive_path).unlink(missing_ok=True)
                raise Refused(f"the director refused experiment {experiment_name}: {why}") from None
        return await set_new_experiment(self, experiment_name=experiment_name, sender_name=sender_name,
                                        experiment_archive_path=experiment_archive_path, **kwargs)

    return wrapper


def install() -> None:
    """Envoys check each experiment before unpacking it; the director checks each submission."""
    from openfl.component.director.director import Director
    from openfl.transport.grpc.director_client import ShardDirectorClient

    replace(ShardDirectorClient, "wait_experiment", checking_wait)
    replace(ShardDirectorClient, "get_experiment_data", serving_checked)
    replace(Director, "set_new_experiment", signed_by_sender)

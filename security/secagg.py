"""Secure aggregation: the director learns the round's weighted mean of the envoys' updates, never one envoy's.

The protocol is SecAgg (Bonawitz et al., CCS 2017), run afresh every round (under mutual TLS with the checks of its
malicious-server variant, below):

1. Advertise. Each envoy u makes two X25519 key pairs, c (to encrypt shares) and s (to derive masks), and sends
   their public halves with its training-set size n_u. The director relays every envoy's to every envoy (U1).
2. Share. u draws a self-mask seed b_u, splits b_u and its private key s_u into Shamir shares, threshold t of
   |U1|, and sends each other envoy v its two shares, encrypted with AES-GCM under a key agreed with v (c keys):
   the director routes ciphertexts it cannot read (U2: the envoys whose shares arrived).
3. Masked input. u encodes (n_u / sum of n over U1) x its update in fixed point, in the ring of 2^64, and adds
   PRG(b_u) and, for every other v in U2, +PRG(s_uv) if u comes before v by name, else -PRG(s_uv), where s_uv is
   agreed from u's s key and v's: the pairwise masks cancel in the sum (U3: the envoys whose input arrived).
4. Unmask. Each envoy of U3 reveals, to the director, its shares of b_v for every v in U3 and of s_v for every v
   that dropped out between 2 and 3 (never both for one v). With t shares the director rebuilds each, removes the
   self-masks and the dropped envoys' pairwise masks, and is left with the sum. Fewer than t: the round fails.
   Under mutual TLS, before revealing, each survivor signs the U3 it was told (the consistency round), and
   reveals only once a threshold of survivors' signatures on the same U3 arrived.

What the director sees of one envoy: its public keys, its training-set size, ciphertexts, its metrics, and a
masked vector that is uniform in the ring whatever the update. Keys are fresh each round, so what is revealed for
an envoy that dropped out says nothing about other rounds. Against a director that lies, each envoy checks what
it can alone (Bonawitz's malicious-server checks that need no signatures): a threshold of more than half the round,
at least a threshold's worth of shares before it masks (an empty inbox would leave only the self-mask) and of
survivors before it reveals, and never both secrets of one envoy. The director freezes U3 at the first unmasking
request and checks each rebuilt secret against its envoy's advertisement (the public key; a commitment to b). Under
mutual TLS each envoy also signs its advertisement with its certificate's key (a director cannot substitute keys
or make up peers), and signs the U3 it was told in a consistency round before revealing (a director cannot tell
envoys different lists): SecAgg's malicious-server variant, with the hospitals' certificates as the PKI.
Primitives: X25519, HKDF-SHA256, SHA-256, AES-GCM and ChaCha20 from `cryptography`, ECDSA and X.509 through
security.signing, Shamir's secret sharing from PyCryptodome; the protocol logic is this module's.

Where each half runs: the envoy's (security.secagg_envoy) on each envoy node, where its collaborator sends the
train task's results; the director's (security.secagg_director) on the director, inside the experiment's aggregator
(medfl.aggregator.SelectingAggregator), which it routes the protocol's messages for. Messages ride OpenFL's own
calls to the aggregator: an envoy sends one as task results of a task named `secagg/<step>`, and fetches one as
an aggregated tensor of that name, which the aggregator holds until it is ready. This module is what both halves
share: the protocol's arithmetic and state, and the plan settings that switch it on (plan()).
"""
from __future__ import annotations

import base64
import json
import os
import time

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .signing import Refused, certified, check_signature, sign_bytes

# Fixed point in the ring of 2^64: 48 fractional bits (a resolution of 3.6e-15, so that the mean rounds to the same
# float32 weights as the plain mean nearly always) and 15 integer bits for the sum. Each envoy clips its update to
# max_update_norm (so no element exceeds it) and weighs it by its share of the samples (the weights add up to 1), so
# no element of the sum exceeds the bound: up to 2^14 it cannot overflow.
FRACTION_BITS = 48
LARGEST_BOUND = 2.0 ** 14
STEP = "secagg/"  # the prefix of the task and tensor names that carry the protocol's messages
ADVERTISED = ("c", "s", "samples", "b")  # what an envoy's advertisement says, and its signature covers
COUNTERS = ("num_batches_tracked",)  # step counters (BatchNorm's): summed, but not part of an update's norm


class SecAggError(RuntimeError):
    """The protocol cannot go on; the message says why, in one line."""


class BadShare(SecAggError):
    """A revealed share rebuilds something other than what its envoy advertised; `sender` revealed it (None when
    too few shares are left to tell whose it was)."""

    def __init__(self, message: str, sender: str | None = None):
        super().__init__(message)
        self.sender = sender


# --- primitives, each from a vetted library ----------------------------------------------------------------------
def encode(values: np.ndarray) -> np.ndarray:
    """Real values (|v| < 2^14) as ring elements: fixed point with FRACTION_BITS, two's complement in 2^64."""
    return np.rint(np.asarray(values, dtype=np.float64) * 2.0 ** FRACTION_BITS).astype(np.int64).view(np.uint64)


def decode(ring: np.ndarray) -> np.ndarray:
    """encode()'s inverse, for a sum of encoded values too."""
    return np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0 ** FRACTION_BITS


def prg(seed: bytes, count: int) -> np.ndarray:
    """`count` pseudo-random ring elements from a 32-byte seed: ChaCha20's keystream (each seed is used once)."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * count))
    return np.frombuffer(stream, dtype=np.uint64)


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def commitment(secret: bytes, context: bytes) -> bytes:
    """SHA-256 of the round's context and a secret: binds an envoy to its self-mask seed without showing it."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"commit|" + context + b"|" + secret)
    return digest.finalize()


def agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    """A 32-byte key that `private`'s owner and `public`'s owner both derive, for one purpose (`info`)."""
    return _derive(private.exchange(X25519PublicKey.from_public_bytes(public)), info)


def split(secret: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """Shamir shares (index from 1, 32 bytes) of a 32-byte secret: any `threshold` of `count` rebuild it."""
    from Crypto.Protocol.SecretSharing import Shamir

    halves = [Shamir.split(threshold, count, secret[i:i + 16]) for i in (0, 16)]
    return [(index, first + second) for (index, first), (_, second) in zip(*halves, strict=True)]


def combine(shares: list[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret of `threshold` or more shares; SecAggError below that (Shamir would return a wrong one)."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len({index for index, _ in shares}) < threshold:
        raise SecAggError(f"{len(shares)} shares, fewer than the threshold {threshold}: the secret stays hidden")
    shares = sorted(dict(shares).items())[:threshold]
    return b"".join(Shamir.combine([(index, share[i:i + 16]) for index, share in shares]) for i in (0, 16))


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], context)


def _raw(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bytes(text: str) -> bytes:
    return base64.b64decode(text)


def majority(count: int) -> int:
    """The default threshold: more than half of the round's envoys."""
    return count // 2 + 1


def sign(u: str, v: str) -> int:
    """+1 if u adds the pair's mask, -1 if it subtracts it: the envoy first by name adds."""
    return 1 if u < v else -1


# --- one envoy's part of one round ---------------------------------------------------------------------------------
class EnvoyRound:
    """Envoy `name`'s side of one round, `context` naming the experiment and round (it binds every key and
    ciphertext to them). With mutual TLS, `signer` is (this envoy's certificate PEM, its private key, the federation's
    CA certificate): it signs its advertisement, and takes part only with peers whose advertisements carry a valid
    signature by the envoy of that name."""

    def __init__(self, name: str, context: str, samples: int, signer: tuple | None = None):
        self.name, self.context, self.samples, self.signer = name, context.encode(), int(samples), signer
        self.c, self.s, self.b = X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(32)
        self.peers: dict = {}
        self.certificates: dict = {}  # v: its certificate, once its advertisement's signature checked out
        self.held: dict[str, tuple[tuple[int, bytes], tuple[int, bytes]]] = {}  # v: my shares of (s_v, b_v)
        self.u2: list[str] = []

    def advertise(self) -> dict:
        """Both public keys, the training-set size, and a commitment to the self-mask seed b (the director checks
        the b it rebuilds against it, as it checks a rebuilt s against the public key)."""
        advertised = {"c": _b64(_public(self.c)), "s": _b64(_public(self.s)), "samples": self.samples,
                      "b": _b64(commitment(self.b, self.context))}
        if self.signer:
            cert, key, _ = self.signer
            advertised.update(cert=cert.decode(), sig=_b64(sign_bytes(key, self._signed(advertised))))
        return advertised

    def _signed(self, advertised: dict) -> bytes:
        """What an advertisement's signature covers: its keys, count and commitment, bound to this round."""
        return b"\n".join((b"medfl-secagg-advertisement-v1", self.context,
                           json.dumps({k: advertised[k] for k in ADVERTISED}, sort_keys=True).encode()))

    def _check_peer(self, v: str, advertised: dict) -> None:
        """SecAggError, naming v, unless its advertisement is signed by the envoy named v under this CA."""
        if "sig" not in advertised or "cert" not in advertised:
            raise SecAggError(f"{v}'s advertisement is not signed: under mutual TLS every envoy signs its keys, and "
                              "this one takes part only with envoys whose keys it can check")
        try:
            cert = certified(str(advertised["cert"]).encode(), self.signer[2], v, "envoy")
            check_signature(cert, _bytes(advertised["sig"]), self._signed(advertised))
            self.certificates[v] = cert
        except Refused as exc:
            raise SecAggError(f"{v}'s advertisement is refused: {exc}") from None
        except (InvalidSignature, ValueError, KeyError, TypeError):
            raise SecAggError(f"{v}'s advertisement does not match its signature: its keys were changed on the way "
                              "(a director that substitutes keys could open the shares sealed for it)") from None

    def share(self, peers: dict, threshold: int) -> dict[str, str]:
        """Given every envoy's advertisement (U1, this one included): the encrypted shares for each other one."""
        if self.name not in peers:
            raise SecAggError(f"the director left {self.name} out of the round's envoys")
        if self.signer:
            for v, advertised in sorted(peers.items()):
                if v != self.name:
                    self._check_peer(v, advertised)
        if not max(2, majority(len(peers))) <= threshold <= len(peers):
            # at or below half, the envoys the director names as dropped and those it names as survivors could
            # each be a threshold: the same envoy's two secrets rebuilt from two halves
            raise SecAggError(f"threshold {threshold} for {len(peers)} envoys: this envoy takes part only with more "
                              f"than half of them ({max(2, majority(len(peers)))} or more) and at most their number")
        self.peers = {v: {"c": _bytes(p["c"]), "s": _bytes(p["s"]), "samples": int(p["samples"])}
                      for v, p in sorted(peers.items())}
        self.threshold, names = threshold, list(self.peers)
        s_shares, b_shares = split(_raw(self.s), threshold, len(names)), split(self.b, threshold, len(names))
        sealed = {}
        for v, s_share, b_share in zip(names, s_shares, b_shares, strict=True):
            if v == self.name:
                self.held[v] = (s_share, b_share)
                continue
            message = json.dumps({"s": [s_share[0], _b64(s_share[1])], "b": [b_share[0], _b64(b_share[1])]})
            sealed[v] = _b64(seal(self._channel(v), message.encode(), self._about(self.name, v)))
        return sealed

    def masked(self, update: np.ndarray, inbox: dict[str, str]) -> np.ndarray:
        """The ring vector to send: this envoy's weighted, encoded update plus its masks; `inbox` holds the
        shares the other envoys of U2 sent it (their names are U2)."""
        for u, sealed in inbox.items():
            if u not in self.peers or u == self.name:
                raise SecAggError(f"shares from {u}, which is not another envoy of this round")
            try:
                message = json.loads(unseal(self._channel(u), _bytes(sealed), self._about(u, self.name)))
            except Exception as exc:  # a ciphertext the director changed, or one for another round
                raise SecAggError(f"the shares from {u} do not open ({type(exc).__name__}): they were changed on "
                                  "the way") from None
            self.held[u] = ((message["s"][0], _bytes(message["s"][1])), (message["b"][0], _bytes(message["b"][1])))
        self.u2 = sorted([*inbox, self.name])
        if len(self.u2) < self.threshold:  # with no pairwise mask, the self-mask alone would hide the update
            raise SecAggError(f"shares arrived from {len(inbox)} other envoys, where the round needs "
                              f"{self.threshold - 1}: the director could unmask this update by asking the others for "
                              "its self-mask; it is not sent")
        total = sum(self.peers[v]["samples"] for v in self.peers)
        y = encode(np.asarray(update, dtype=np.float64) * (self.samples / total))
        y = y + prg(self.b, y.size)
        for v in self.u2:
            if v != self.name:
                mask = prg(agree(self.s, self.peers[v]["s"], b"mask|" + self.context), y.size)
                y = y + mask if sign(self.name, v) > 0 else y - mask
        return y

    def confirm(self, survivors: list[str]) -> dict:
        """Under mutual TLS, the consistency round: this envoy's signature on the survivors (U3) it was told."""
        cert, key, _ = self.signer
        return {"sig": _b64(sign_bytes(key, self._u3(survivors)))}

    def check_confirmations(self, survivors: list[str], confirmations: dict[str, dict]) -> None:
        """Reveal only if a threshold of the survivors signed the same U3 as this envoy was told: a director that
        tells envoys different lists (to have each reveal what, together, unmasks one envoy) is caught here.
        SecAggError, naming who signed another list, otherwise."""
        confirmed = []
        for v, confirmation in sorted(confirmations.items()):
            if v not in survivors or v not in self.certificates and v != self.name:
                continue  # only the survivors' signatures count, each checked against its advertised certificate
            cert = self.certificates.get(v) or x509.load_pem_x509_certificate(self.signer[0])
            try:
                check_signature(cert, _bytes(confirmation["sig"]), self._u3(survivors))
            except (InvalidSignature, ValueError, KeyError, TypeError):
                raise SecAggError(f"refused to reveal: {v} signed another list of survivors than {self.name} was "
                                  f"told ({', '.join(sorted(survivors))}): the director told envoys different lists"
                                  ) from None
            confirmed.append(v)
        if len(confirmed) < self.threshold:
            raise SecAggError(f"refused to reveal: {len(confirmed)} survivors confirmed the list "
                              f"({', '.join(confirmed) or 'none'}), fewer than the threshold {self.threshold}")

    def _u3(self, survivors: list[str]) -> bytes:
        return b"\n".join((b"medfl-secagg-survivors-v1", self.context, json.dumps(sorted(survivors)).encode()))

    def reveal(self, survivors: list[str], dropped: list[str]) -> dict:
        """This envoy's shares for the unmasking: of b for the survivors, of s for the dropped, never both for one
        envoy; SecAggError for a request an honest director would not make."""
        survivors, dropped = set(survivors), set(dropped)
        if survivors & dropped or not survivors | dropped <= set(self.u2) or self.name not in survivors:
            raise SecAggError(f"refused to reveal: survivors {sorted(survivors)} and dropped {sorted(dropped)} are "
                              f"not a split of the round's envoys {self.u2}")
        if len(survivors) < self.threshold:
            raise SecAggError(f"refused to reveal: {len(survivors)} survivors, fewer than the threshold "
                              f"{self.threshold}: a sum of so few inputs is too close to one envoy's")
        return {"b": {v: [self.held[v][1][0], _b64(self.held[v][1][1])] for v in sorted(survivors)},
                "s": {v: [self.held[v][0][0], _b64(self.held[v][0][1])] for v in sorted(dropped)}}

    def _channel(self, v: str) -> bytes:
        return agree(self.c, self.peers[v]["c"], b"shares|" + self.context)

    def _about(self, sender: str, receiver: str) -> bytes:
        return f"{sender}>{receiver}|".encode() + self.context


# --- the director's part of one round ------------------------------------------------------------------------------
class DirectorRound:
    """What the director keeps of one round: who advertised (U1), whose shares arrived (U2), whose masked input
    (U3), and the revealed shares; sum() unmasks."""

    def __init__(self, envoys: list[str], threshold: int, context: str):
        self.envoys, self.threshold, self.context = sorted(envoys), threshold, context.encode()
        self.advertised: dict[str, dict] = {}
        self.sealed: dict[str, dict[str, str]] = {}  # sender: {receiver: ciphertext}
        self.inputs: dict[str, np.ndarray] = {}
        self.reveals: dict[str, dict] = {}
        self.confirmations: dict[str, dict] = {}  # under mutual TLS: each survivor's signature on U3
        self.dropped: set[str] = set()
        self.frozen = False  # see freeze()
        self.started = time.monotonic()  # (secagg_director restarts it once every envoy has advertised)

    def waiting_for(self, step: str) -> list[str]:
        """The envoys a step still waits for (those dropped wait for nothing)."""
        have = {"advertise": self.advertised, "share": self.sealed, "masked": self.inputs,
                "confirm": self.confirmations}[step]
        expected = {"advertise": self.envoys, "share": self.u1, "masked": self.u2, "confirm": self.u3}[step]
        return [v for v in expected if v not in have and v not in self.dropped]

    @property
    def u1(self) -> list[str]:
        return sorted(self.advertised)

    @property
    def u2(self) -> list[str]:
        return sorted(self.sealed)

    @property
    def u3(self) -> list[str]:
        return sorted(self.inputs)

    def check_quorum(self, step: str) -> None:
        """SecAggError naming who is missing once fewer than the threshold can still take part."""
        alive = [v for v in {"advertise": self.envoys, "share": self.u1, "masked": self.u2, "confirm": self.u3,
                             "reveal": self.u3}[step]
                 if v not in self.dropped or (step == "reveal" and v in self.reveals)]
        if len(alive) < self.threshold:
            missing = sorted(set(self.envoys) - set(alive))
            raise SecAggError(f"secure aggregation needs {self.threshold} of the round's {len(self.envoys)} envoys, "
                              f"{len(alive)} remain ({', '.join(missing)} missing)")

    def _rebuild(self, part: str, v: str, revealed: list[str]) -> bytes:
        """Envoy v's secret `part` ("b" or "s") from the shares the envoys in `revealed` sent, checked against what
        v advertised (its commitment to b, its public key s); BadShare naming the envoy whose share was bad."""
        senders = [r for r in revealed if v in self.reveals[r][part]]
        secret = self._combine(part, v, senders)
        if self._matches(part, v, secret):
            return secret
        for bad in senders:  # the share without which the rest rebuild the advertised secret
            rest = [r for r in senders if r != bad]
            if len(rest) >= self.threshold and self._matches(part, v, self._combine(part, v, rest)):
                raise BadShare(f"the share of {v}'s secret that {bad} revealed is bad: it does not rebuild what {v} "
                               "advertised", bad)
        raise BadShare(f"the shares of {v}'s secret rebuild something other than what {v} advertised; too few "
                       "shares to tell whose was bad; the round fails")

    def _combine(self, part: str, v: str, senders: list[str]) -> bytes:
        return combine([(self.reveals[r][part][v][0], _bytes(self.reveals[r][part][v][1])) for r in senders],
                       self.threshold)

    def _matches(self, part: str, v: str, secret: bytes) -> bool:
        advertised = _bytes(self.advertised[v][part])
        if part == "b":
            return commitment(secret, self.context) == advertised
        return _public(X25519PrivateKey.from_private_bytes(secret)) == advertised

    def freeze(self) -> None:
        """U3 is what it is: the first unmasking request went out (a masked input that comes later is refused)."""
        self.frozen = True

    def receive_input(self, v: str, y: np.ndarray) -> None:
        if self.frozen:
            raise SecAggError(f"{v}'s masked input came after the unmasking began: the round's U3 "
                              f"({', '.join(self.u3)}) stands; it is refused")
        self.inputs[v] = y

    def unmask(self) -> tuple[np.ndarray, float, dict[str, str]]:
        """sum(), leaving out the reveals of every envoy whose share was bad while a threshold of others remain:
        (mean, share, {sender: why}). BadShare when it cannot tell whose share was bad; SecAggError below the
        threshold."""
        bad = {}
        while True:
            try:
                return (*self.sum(), bad)
            except BadShare as exc:
                if exc.sender is None:
                    raise
                bad[exc.sender] = str(exc)
                del self.reveals[exc.sender]

    def inbox(self, receiver: str) -> dict[str, str]:
        return {sender: sealed[receiver] for sender, sealed in self.sealed.items() if receiver in sealed}

    def sum(self) -> tuple[np.ndarray, float]:
        """The decoded weighted sum of U3's updates, rescaled to a weighted mean over U3, and U3's share of U1's
        samples; SecAggError if fewer than the threshold revealed their shares."""
        revealed = sorted(self.reveals)
        if not self.inputs:
            raise SecAggError("no envoy sent its masked update this round")
        if len(revealed) < self.threshold:
            raise SecAggError(f"secure aggregation needs shares from {self.threshold} envoys, {len(revealed)} sent "
                              f"them ({', '.join(v for v in self.u3 if v not in self.reveals) or 'none'} missing)")
        total = np.zeros_like(next(iter(self.inputs.values())))
        for y in self.inputs.values():
            total += y  # uint64: wraps around, as the ring does
        for v in self.u3:  # self-masks
            total -= prg(self._rebuild("b", v, revealed), total.size)
        for v in sorted(set(self.u2) - set(self.u3)):  # the pairwise masks of envoys that dropped out before input
            s = X25519PrivateKey.from_private_bytes(self._rebuild("s", v, revealed))
            for w in self.u3:
                mask = prg(agree(s, _bytes(self.advertised[w]["s"]), b"mask|" + self.context), total.size)
                total = total - mask if sign(w, v) > 0 else total + mask  # what w added for v, taken back
        samples = {v: int(self.advertised[v]["samples"]) for v in self.u1}
        share = sum(samples[v] for v in self.u3) / sum(samples.values())
        return decode(total) / share, share

# --- the messages' timing, and the update as one vector -------------------------------------------------------
POLL_S = 10.0  # the aggregator holds a request for a message this long before answering "not yet"
DEADLINE_S = 3600.0  # an envoy gives up on a round whose protocol has not moved on for this long


def flatten(tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[str, tuple]]]:
    """One float64 vector of the tensors in name order, and the (name, shape) layout to unflatten it."""
    names = sorted(tensors)
    layout = [(name, np.shape(tensors[name])) for name in names]
    return np.concatenate([np.asarray(tensors[n], dtype=np.float64).reshape(-1) for n in names]), layout


def unflatten(vector: np.ndarray, layout: list[tuple[str, tuple]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        out[name] = vector[at:at + size].reshape(shape)
        at += size
    return out


def norm(update: dict[str, np.ndarray]) -> float:
    """The update's L2 norm, step counters left out; SecAggError if it is not finite (such weights would be masked
    past any check)."""
    bad = sorted(name for name, value in update.items() if not np.isfinite(value).all())
    if bad:
        raise SecAggError(f"NaN or infinity in {len(bad)} tensors of the trained weights ({bad[0]} first): not sent")
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for name, v in update.items()
                             if not name.endswith(COUNTERS))))


def clipped(update: dict[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float]:
    """The update with its norm (norm()) clipped to `bound`, and its norm before; each step counter's change kept
    within [0, LARGEST_BOUND], so that their weighted mean cannot wrap the ring either. SecAggError for weights that
    are not finite, or a bound whose sum could wrap the ring."""
    if not 0 < bound <= LARGEST_BOUND:
        raise SecAggError(f"max_update_norm={bound:g}: the ring holds sums up to {LARGEST_BOUND:g}; not sent")
    before = norm(update)
    factor = min(1.0, bound / before) if before else 1.0
    return {name: np.clip(v, 0, LARGEST_BOUND) if name.endswith(COUNTERS) else v * factor
            for name, v in update.items()}, before


# How far an envoy's update may move the global model (L2 norm of the change, BatchNorm's step counters left out):
# under secure aggregation each envoy clips its own to this, since the director cannot see it. The tutorial's CNN
# moves by 2 to 8 a round (synthetic BloodMNIST, 28 px, Adam at 1e-3, measured 2026-12-04).
MAX_UPDATE_NORM = 100.0


def plan(secure_aggregation: bool, threshold: int, max_update_norm: float) -> dict:
    """The experiment's plan overrides that switch both halves on: the director's settings and every envoy's (empty
    when off)."""
    if not secure_aggregation:
        return {}
    return {"aggregator.settings.secure_aggregation": True, "aggregator.settings.secure_threshold": threshold,
            "aggregator.settings.max_update_norm": max_update_norm,
            "collaborator.settings.secure_aggregation": True, "collaborator.settings.max_update_norm": max_update_norm}

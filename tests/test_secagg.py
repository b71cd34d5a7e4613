"""Secure aggregation's protocol in one process (security.secagg): masks that cancel, a sum that decodes to the
weighted mean, envoys that drop out before or after sending, thresholds, and what the director can and cannot
learn. tests/test_secure_aggregation.py runs it in real federations."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import chisquare

from medfl.researcher import ParameterError, check_parameters
from security.secagg import (
    FRACTION_BITS,
    LARGEST_BOUND,
    DirectorRound,
    EnvoyRound,
    SecAggError,
    clipped,
    combine,
    decode,
    encode,
    split,
)

SAMPLES = {"envoy_1": 600, "envoy_2": 300, "envoy_3": 100}
CONTEXT = "aggregator-uuid|2"
# The chi-square test of a vector's bytes against uniform. The masks come from fresh keys (os.urandom), so a
# uniform vector's p-value falls below ALPHA with probability ALPHA: with four such checks per run, the suite fails by
# chance once in 2.5 million runs (at 1e-3 it did, once in a few hundred). The power check below stays: an update
# encoded without masks scores below 1e-100.
ALPHA = 1e-7


def _updates(size: int = 5000, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(scale=1e-2, size=size) for name in SAMPLES}


def _run(updates, threshold=2, drop_before_input=(), drop_after_input=(), envoys=None):
    """The protocol with a director that relays honestly: (director round, envoy rounds)."""
    envoys = envoys or {name: EnvoyRound(name, CONTEXT, SAMPLES[name]) for name in updates}
    director = DirectorRound(list(envoys), threshold, CONTEXT)
    for name, envoy in envoys.items():
        director.advertised[name] = json.loads(json.dumps(envoy.advertise()))  # as it crosses the wire
    for name, envoy in envoys.items():
        director.sealed[name] = envoy.share(director.advertised, threshold)
    for name, envoy in envoys.items():
        if name not in drop_before_input:
            director.inputs[name] = envoy.masked(updates[name], {u: c for u, c in director.inbox(name).items()})
    survivors, dropped = director.u3, sorted(set(director.u2) - set(director.u3))
    for name in survivors:
        if name not in drop_after_input:
            director.reveals[name] = envoys[name].reveal(survivors, dropped)
    director.dropped = set(drop_before_input) | set(drop_after_input)
    return director, envoys


def _weighted_mean(updates, names):
    total = sum(SAMPLES[n] for n in names)
    return sum(updates[n] * (SAMPLES[n] / total) for n in names)


def test_the_masks_cancel_and_the_sum_decodes_to_the_weighted_mean():
    updates = _updates()
    director, _ = _run(updates)
    mean, share = director.sum()
    assert share == 1.0
    expected = _weighted_mean(updates, SAMPLES)
    # Exactly the sum of the encoded, weighted updates: every mask cancelled, in the ring.
    total = sum(SAMPLES.values())
    encoded = sum(encode(updates[n] * (SAMPLES[n] / total)) for n in SAMPLES)
    assert np.array_equal(encode(mean), encoded)
    # Within the fixed point's rounding: half a unit of 2^-40 per envoy.
    assert np.max(np.abs(mean - expected)) <= len(SAMPLES) * 2.0 ** -(FRACTION_BITS + 1)
    assert np.linalg.norm(mean - expected) / np.linalg.norm(expected) < 1e-6


def test_the_sum_of_envoys_at_the_bound_cannot_overflow_with_15_integer_bits():
    # Each envoy's update is clipped to the bound, so no element exceeds it; weights add up to 1: the largest sum
    # is the bound itself, and 2^14 leaves one bit of the 15 for the rounding.
    worst = {name: np.array([LARGEST_BOUND, -LARGEST_BOUND, 1.0]) for name in SAMPLES}
    director, _ = _run(worst)
    mean, _ = director.sum()
    assert np.allclose(mean, [LARGEST_BOUND, -LARGEST_BOUND, 1.0], rtol=0, atol=1e-9)
    assert 63 - FRACTION_BITS == 15
    # A sum one bit past that wraps around in the ring (two envoys' 2^14 add up to -2^15): hence the bound.
    assert decode(encode(np.array([2.0 ** 14])) + encode(np.array([2.0 ** 14]))) == -(2.0 ** 15)


def _uniform(vector: np.ndarray) -> float:
    """The p-value of the vector's bytes against the uniform distribution (chi-square over 256 values)."""
    counts = np.bincount(np.frombuffer(vector.tobytes(), dtype=np.uint8), minlength=256)
    return chisquare(counts).pvalue


def test_one_masked_update_alone_is_indistinguishable_from_uniform():
    updates = _updates(size=20_000)
    updates["envoy_1"] = np.zeros(20_000)  # the most structured update there is
    director, _ = _run(updates)
    for name in SAMPLES:
        assert _uniform(director.inputs[name]) > ALPHA, name
    # The test has power: the same update encoded without masks is far from uniform.
    assert _uniform(encode(updates["envoy_2"])) < 1e-100


def test_shamir_rebuilds_from_any_threshold_and_refuses_below():
    secret = bytes(range(32))
    shares = split(secret, 3, 5)
    assert {combine([shares[i] for i in pick], 3) for pick in ((0, 1, 2), (1, 3, 4), (0, 2, 4))} == {secret}
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        combine(shares[:2], 3)


def test_an_envoy_lost_after_sharing_but_before_its_input_is_left_out_and_the_round_completes():
    updates = _updates(seed=1)
    director, _ = _run(updates, drop_before_input=["envoy_3"])
    mean, share = director.sum()
    assert share == pytest.approx(900 / 1000)
    assert np.max(np.abs(mean - _weighted_mean(updates, ["envoy_1", "envoy_2"]))) < 1e-13


def test_an_envoy_lost_after_sending_its_input_is_unmasked_from_the_others_shares():
    updates = _updates(seed=2)
    director, _ = _run(updates, drop_after_input=["envoy_3"])  # its reveal never comes
    assert sorted(director.reveals) == ["envoy_1", "envoy_2"]
    mean, share = director.sum()
    assert share == 1.0 and np.max(np.abs(mean - _weighted_mean(updates, SAMPLES))) < 1e-13


def test_below_the_threshold_the_round_fails_naming_who_is_missing():
    updates = _updates(seed=3)
    director, _ = _run(updates, threshold=3, drop_after_input=["envoy_3"])
    with pytest.raises(SecAggError, match=r"needs shares from 3 envoys, 2 sent them \(envoy_3 missing\)"):
        director.sum()
    director.dropped = {"envoy_2", "envoy_3"}
    with pytest.raises(SecAggError, match=r"needs 3 of the round's 3 envoys, 1 remain \(envoy_2, envoy_3 missing\)"):
        director.check_quorum("advertise")


def test_the_self_mask_keeps_an_envoy_hidden_when_the_director_falsely_says_it_dropped():
    updates = _updates(size=20_000, seed=4)
    envoys = {name: EnvoyRound(name, CONTEXT, SAMPLES[name]) for name in SAMPLES}
    director, _ = _run(updates, envoys=envoys)
    # The director received envoy_3's input, then tells the others envoy_3 dropped out, to learn its mask key.
    lie = {name: envoys[name].reveal(["envoy_1", "envoy_2"], ["envoy_3"]) for name in ("envoy_1", "envoy_2")}
    director.reveals = lie
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from security.secagg import _bytes, agree, prg, sign

    s3 = X25519PrivateKey.from_private_bytes(director._rebuild("s", "envoy_3", sorted(lie)))
    y3 = director.inputs["envoy_3"].copy()
    for w in ("envoy_1", "envoy_2"):  # every pairwise mask of envoy_3, removed
        mask = prg(agree(s3, _bytes(director.advertised[w]["s"]), b"mask|" + CONTEXT.encode()), y3.size)
        y3 = y3 - mask if sign("envoy_3", w) > 0 else y3 + mask
    weighted = encode(updates["envoy_3"] * SAMPLES["envoy_3"] / sum(SAMPLES.values()))
    assert not np.array_equal(y3, weighted)
    assert _uniform(y3) > ALPHA  # what is left is still uniform: the self-mask, whose shares were not revealed
    # And no honest envoy reveals both secrets of one envoy, nor takes part in a split that leaves itself out.
    with pytest.raises(SecAggError, match="refused to reveal"):
        envoys["envoy_1"].reveal(["envoy_1", "envoy_3"], ["envoy_3"])
    with pytest.raises(SecAggError, match="refused to reveal"):
        envoys["envoy_1"].reveal(["envoy_2"], ["envoy_1"])


def test_shares_changed_on_the_way_are_refused():
    envoys = {name: EnvoyRound(name, CONTEXT, SAMPLES[name]) for name in SAMPLES}
    advertised = {name: e.advertise() for name, e in envoys.items()}
    sealed = {name: e.share(advertised, 2) for name, e in envoys.items()}
    forged = sealed["envoy_2"]["envoy_1"][:-4] + "AAA="
    with pytest.raises(SecAggError, match="the shares from envoy_2 do not open"):
        envoys["envoy_1"].masked(np.zeros(10), {"envoy_2": forged, "envoy_3": sealed["envoy_3"]["envoy_1"]})
    other_round = EnvoyRound("envoy_1", "aggregator-uuid|3", 600)  # a ciphertext replayed into another round
    other_round.share(advertised | {"envoy_1": other_round.advertise()}, 2)
    with pytest.raises(SecAggError, match="do not open"):
        other_round.masked(np.zeros(10), {"envoy_2": sealed["envoy_2"]["envoy_1"]})


def test_each_envoy_refuses_to_mask_what_is_not_finite_and_clips_its_update():
    update = {"conv.weight": np.full(4, 3.0), "bn.num_batches_tracked": np.array(10.0)}
    same, norm = clipped(update, 100.0)
    assert norm == 6.0 and all(np.array_equal(same[k], update[k]) for k in update)  # the counter is not in the norm
    smaller, norm = clipped(update, 3.0)
    assert norm == 6.0 and np.allclose(smaller["conv.weight"], 1.5) and smaller["bn.num_batches_tracked"] == 10.0
    with pytest.raises(SecAggError, match="NaN or infinity in 1 tensors"):
        clipped({"conv.weight": np.array([np.nan])}, 1.0)


def test_the_step_counters_change_is_kept_in_the_ring_and_a_bound_past_it_is_refused_on_the_envoy():
    """A weighted mean of 2^15 batches or more would wrap the ring silently; a bound above 2^14 could too."""
    kept, _ = clipped({"w": np.ones(2), "bn.num_batches_tracked": np.array(1e6), "b.num_batches_tracked": -3.0}, 1.0)
    assert kept["bn.num_batches_tracked"] == LARGEST_BOUND and kept["b.num_batches_tracked"] == 0
    with pytest.raises(SecAggError, match="max_update_norm=32768: the ring holds sums up to 16384; not sent"):
        clipped({"w": np.ones(2)}, 2.0 ** 15)


# --- a director that lies (Bonawitz et al. 2017, the malicious-server checks an envoy can make on its own) ----------
def _advertised(envoys):
    return {name: json.loads(json.dumps(e.advertise())) for name, e in envoys.items()}


def test_an_envoy_given_an_empty_inbox_refuses_to_mask_its_update():
    """The attack: the director gives one envoy no shares, so its input carries only its self-mask, then asks the
    others to reveal that self-mask as if the envoy had sent normally. Without this check, the update came back to
    within 3e-15 (issue #36)."""
    envoys = {name: EnvoyRound(name, CONTEXT, SAMPLES[name]) for name in SAMPLES}
    advertised = _advertised(envoys)
    sealed = {name: e.share(advertised, 2) for name, e in envoys.items()}
    with pytest.raises(SecAggError, match="shares arrived from 0 other envoys, where the round needs 1: the director "
                                          "could unmask this update"):
        envoys["envoy_1"].masked(np.zeros(10), {})
    # one other envoy's shares meet a threshold of 2: the pairwise mask with it hides the update
    envoys["envoy_2"].masked(np.zeros(10), {"envoy_3": sealed["envoy_3"]["envoy_2"]})


@pytest.mark.parametrize("envoys, threshold, refused", [(4, 2, True), (5, 2, True), (3, 1, True), (2, 1, True),
                                                        (4, 3, False), (3, 2, False), (2, 2, False), (3, 4, True)])
def test_every_envoy_refuses_a_threshold_at_or_below_half_of_the_round_whatever_the_director_says(envoys, threshold,
                                                                                                  refused):
    """At or below half, the envoys named as survivors and those named as dropped could each make a threshold:
    one envoy's two secrets, rebuilt from two halves of the round."""
    names = [f"envoy_{i}" for i in range(1, envoys + 1)]
    rounds = {name: EnvoyRound(name, CONTEXT, 100) for name in names}
    if refused:
        with pytest.raises(SecAggError, match=f"threshold {threshold} for {envoys} envoys: this envoy takes part "
                                              "only with more than half"):
            rounds["envoy_1"].share(_advertised(rounds), threshold)
    else:
        rounds["envoy_1"].share(_advertised(rounds), threshold)


def test_an_envoy_refuses_to_reveal_for_fewer_survivors_than_the_threshold():
    updates = _updates(seed=6)
    director, envoys = _run(updates, threshold=3)
    with pytest.raises(SecAggError, match="refused to reveal: 2 survivors, fewer than the threshold 3"):
        envoys["envoy_1"].reveal(["envoy_1", "envoy_2"], ["envoy_3"])


def test_a_masked_input_after_the_first_unmasking_request_is_refused():
    updates = _updates(seed=7)
    director, envoys = _run(updates, drop_before_input=["envoy_3"])
    director.freeze()  # what the director does as it answers the first envoy that asks what to unmask
    late = envoys["envoy_3"].masked(updates["envoy_3"], director.inbox("envoy_3"))
    with pytest.raises(SecAggError, match=r"envoy_3's masked input came after the unmasking began: the round's U3 "
                                          r"\(envoy_1, envoy_2\) stands"):
        director.receive_input("envoy_3", late)
    assert director.u3 == ["envoy_1", "envoy_2"]
    mean, _ = director.sum()
    assert np.max(np.abs(mean - _weighted_mean(updates, ["envoy_1", "envoy_2"]))) < 1e-13


def test_a_bad_share_is_caught_against_what_its_envoy_advertised_and_its_sender_named():
    updates = _updates(seed=8)
    director, _ = _run(updates)  # threshold 2, three envoys reveal: one share to spare
    index, share = director.reveals["envoy_1"]["b"]["envoy_3"]
    director.reveals["envoy_1"]["b"]["envoy_3"] = [index, share[:-8] + "AAAAAAA="]
    with pytest.raises(SecAggError, match="the share of envoy_3's secret that envoy_1 revealed is bad"):
        director.sum()
    del director.reveals["envoy_2"]  # two left, the threshold: a bad share is seen, its sender cannot be told
    with pytest.raises(SecAggError, match="too few shares to tell whose was bad"):
        director.sum()
    # An s share, for an envoy that dropped out before its input: checked against its advertised public key (the
    # two survivors' shares are all there are, so the sender is not named)
    director, _ = _run(updates, drop_before_input=["envoy_3"])
    index, share = director.reveals["envoy_2"]["s"]["envoy_3"]
    director.reveals["envoy_2"]["s"]["envoy_3"] = [index, share[:-8] + "AAAAAAA="]
    with pytest.raises(SecAggError, match="the shares of envoy_3's secret rebuild something other than what envoy_3 "
                                          "advertised"):
        director.sum()


# --- signed advertisements: the federation's mTLS certificates as the PKI -------------------------------------------
@pytest.fixture(scope="module")
def signers(tmp_path_factory):
    """{envoy: (certificate PEM, private key, CA certificate)} of a federation's CA, and a stranger's of another CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from security.certs import make

    def load(folder, name):
        return ((folder / f"{name}.crt").read_bytes(),
                serialization.load_pem_private_key((folder / f"{name}.key").read_bytes(), password=None),
                x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes()))

    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    make(ours, envoys=tuple(SAMPLES), researchers=("alice",))
    make(theirs, envoys=("envoy_2",), researchers=("bob",))
    found = {name: load(ours, name) for name in (*SAMPLES, "alice")}
    found["stranger"] = load(theirs, "envoy_2")
    return found


def _signed_envoys(signers):
    return {name: EnvoyRound(name, CONTEXT, SAMPLES[name], signers[name]) for name in SAMPLES}


def test_signed_advertisements_run_the_round_as_before(signers):
    updates = _updates(seed=9)
    director, _ = _run(updates, envoys=_signed_envoys(signers))
    mean, share = director.sum()
    assert share == 1.0 and np.max(np.abs(mean - _weighted_mean(updates, SAMPLES))) < 1e-13
    assert {"cert", "sig"} <= set(director.advertised["envoy_1"])


def _forged(signers, change) -> str:
    """What envoy_1 says when the director relays every signed advertisement, one of them changed by `change`."""
    envoys = _signed_envoys(signers)
    advertised = _advertised(envoys)
    change(advertised)
    with pytest.raises(SecAggError) as refused:
        envoys["envoy_1"].share(advertised, 2)
    return str(refused.value)


def test_a_public_key_the_director_swapped_in_is_refused_naming_the_peer(signers):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from security.secagg import _b64, _public

    mine = _b64(_public(X25519PrivateKey.generate()))  # the director's own key, to open what is sealed for envoy_2
    for part in ("c", "s"):
        message = _forged(signers, lambda a, part=part: a["envoy_2"].update({part: mine}))
        assert message.startswith("envoy_2's advertisement does not match its signature: its keys were changed")
    message = _forged(signers, lambda a: a["envoy_3"].update(samples=10 ** 6))  # the count is signed too
    assert message.startswith("envoy_3's advertisement does not match its signature")


@pytest.mark.parametrize("who, expected", [
    ("unsigned", "envoy_2's advertisement is not signed"),
    ("envoy_3", "envoy_2's advertisement is refused: its certificate is 'envoy_3''s, as envoy, not 'envoy_2''s"),
    ("alice", "envoy_2's advertisement is refused: its certificate is 'alice''s, as researcher, not 'envoy_2''s"),
    ("stranger", "envoy_2's advertisement is refused: its certificate is not from this federation's CA")])
def test_an_advertisement_not_signed_by_the_envoy_of_that_name_under_this_ca_is_refused(signers, who, expected):
    """The director (or an envoy) that makes up a peer, or signs for one with another certificate."""
    def replace(advertised):
        if who == "unsigned":
            del advertised["envoy_2"]["sig"]
            return
        fake = EnvoyRound("envoy_2", CONTEXT, 300, signers[who]).advertise()  # keys the director holds, signed
        advertised["envoy_2"] = fake

    assert _forged(signers, replace).startswith(expected)


def test_each_envoy_reveals_only_once_a_threshold_of_survivors_signed_the_same_list(signers):
    """The consistency round (Bonawitz et al. 2017): a director that tells envoy_1 that all three sent their input,
    and envoy_2 that envoy_3 dropped out, would get envoy_3's self-mask seed from one and its mask key from the
    other. Each envoy signs the list it was told and reveals only if a threshold of survivors signed the same."""
    updates = _updates(seed=10)
    director, envoys = _run(updates, envoys=_signed_envoys(signers))
    everyone = ["envoy_1", "envoy_2", "envoy_3"]
    honest = {v: envoys[v].confirm(everyone) for v in everyone}
    for v in everyone:
        envoys[v].check_confirmations(everyone, honest)  # all told the same: each may reveal
    # Told different lists: envoy_2 signed [envoy_1, envoy_2]; envoy_1, told all three, sees it and refuses.
    lied = {**honest, "envoy_2": envoys["envoy_2"].confirm(["envoy_1", "envoy_2"])}
    with pytest.raises(SecAggError, match=r"refused to reveal: envoy_2 signed another list of survivors than "
                                          r"envoy_1 was told \(envoy_1, envoy_2, envoy_3\): the director told"):
        envoys["envoy_1"].check_confirmations(everyone, lied)
    # A director that withholds the others' signatures, or forges one, gets no reveal either.
    with pytest.raises(SecAggError, match="1 survivors confirmed the list \\(envoy_1\\), fewer than the threshold 2"):
        envoys["envoy_1"].check_confirmations(everyone, {"envoy_1": honest["envoy_1"]})
    forged = {**honest, "envoy_3": envoys["envoy_1"].confirm(everyone)}  # envoy_1's, passed off as envoy_3's
    with pytest.raises(SecAggError, match="envoy_3 signed another list"):
        envoys["envoy_2"].check_confirmations(everyone, forged)


def test_the_director_unmasks_without_the_envoy_whose_share_was_bad_and_names_it():
    """A lying envoy's bad share would fail the round for everyone; with a spare share the others' rebuild every
    secret, the round completes, and the liar is named (security.secagg_director drops it)."""
    from types import SimpleNamespace

    from security.secagg_director import SecureRounds

    updates = _updates(seed=11)
    director, _ = _run(updates)
    index, share = director.reveals["envoy_1"]["b"]["envoy_3"]
    director.reveals["envoy_1"]["b"]["envoy_3"] = [index, share[:-8] + "AAAAAAA="]
    rounds = SecureRounds(SimpleNamespace(dropped={}), 2, 100.0)
    rounds.rounds[0] = director
    model = {"w": np.zeros(5000)}
    weights, report = rounds.mean(0, model)
    assert list(report["bad_shares"]) == ["envoy_1"]
    assert "the share of envoy_3's secret that envoy_1 revealed is bad" in report["bad_shares"]["envoy_1"]
    assert np.max(np.abs(weights["w"] - _weighted_mean(updates, SAMPLES))) < 1e-6  # float32 model plus the mean
    # With no spare share, whose it was cannot be told: the round is void, the model stays, the run goes on.
    director, _ = _run(updates)
    director.reveals["envoy_1"]["b"]["envoy_3"] = [index, share[:-8] + "AAAAAAA="]
    del director.reveals["envoy_2"]
    rounds.rounds[0] = director
    weights, report = rounds.mean(0, model)
    assert weights is None and "too few shares to tell whose was bad" in report["rejected"]


PARAMETERS = dict(dataset="bloodmnist", size=28, rounds=2, epochs=1, train_batch_size=64, eval_batch_size=256,
                  learning_rate=1e-3)


def test_what_secure_aggregation_cannot_work_with_is_refused_in_one_line():
    check_parameters(**PARAMETERS, secure_aggregation=True, algorithm="fedadam")
    check_parameters(**PARAMETERS, secure_aggregation=True, dp=True)
    for given, message in (
            (dict(algorithm="median"), "algorithm='median' needs each envoy's update, which secure aggregation "
                                       "hides from the director"),
            (dict(algorithm="geomedian"), "algorithm='geomedian' needs each envoy's update"),
            (dict(run={"wire_dtype": "float16"}), "masked updates travel as 64-bit ring elements"),
            (dict(run={"secure_threshold": 1}), "secure_threshold=1: give the number of envoys"),
            (dict(run={"max_update_norm": 2.0 ** 15}), "max_update_norm=32768.0: give a positive number up to "
                                                      "16384"),
            (dict(secure_aggregation="yes"), "secure_aggregation='yes': True")):
        with pytest.raises(ParameterError) as refused:
            check_parameters(**{**PARAMETERS, "secure_aggregation": True, **given})
        assert message in str(refused.value) and "\n" not in str(refused.value)
    check_parameters(**PARAMETERS, algorithm="median")  # without secure aggregation, median is fine

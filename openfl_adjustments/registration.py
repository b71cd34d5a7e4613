"""The director accepts an envoy only if it serves the same kind of data as the envoys already registered.

OpenFL's director compares an envoy's sample and label shapes with its own config's, nothing more: an envoy whose
file is another MedMNIST dataset of the same shapes (BloodMNIST and PathMNIST are both 28x28x3 with one label)
would join, and the federation would average models of different tasks. Where an envoy's shard description says
what it serves (this project's shard descriptor: dataset, image size, classes), the director compares that with
every other online envoy's and refuses a mismatch in one line naming the envoy; the envoy then stops, as it
does for mismatched shapes.
"""
from __future__ import annotations

import json
import logging

from .patching import replace

logger = logging.getLogger("openfl_adjustments")


def served(shard_info: dict) -> dict | None:
    """What an envoy's description says it serves: dataset, size and classes; None for another descriptor."""
    try:
        described = json.loads(shard_info.get("shard_description") or "")
    except ValueError:
        return None
    if not isinstance(described, dict) or "flag" not in described:
        return None
    classes = len(described.get("label_histogram", {}).get("train", []))
    return {"dataset": described["flag"], "size": described.get("size"), "classes": classes}


SPLITS = ("train", "val", "test")


def split_samples(shard_info: dict) -> dict[str, int] | None:
    """The size of each split (train, val, test) an envoy's description registered (medmnist_shard's `samples`);
    None if it does not say all three as whole numbers."""
    try:
        samples = json.loads(shard_info.get("shard_description") or "")["samples"]
        sizes = {split: samples[split] for split in SPLITS}
    except (ValueError, TypeError, KeyError):
        return None
    whole = all(isinstance(n, int) and not isinstance(n, bool) for n in sizes.values())
    return sizes if whole else None


def registered_samples(registry: dict) -> dict[str, dict[str, int]]:
    """{envoy: {train, val, test: size}} of the director's shard registry, for the envoys whose description says."""
    found = {name: split_samples(entry["shard_info"]) for name, entry in list(registry.items())}
    return {name: samples for name, samples in found.items() if samples is not None}


def _text(what: dict) -> str:
    return f"{what['dataset']} at {what['size']} px with {what['classes']} classes"


def mismatch(name: str, what: dict | None, registry: dict) -> str | None:
    """Why envoy `name`, serving `what`, does not fit the other registered envoys; None if it does."""
    if what is None:
        return None
    others: dict[str, list[str]] = {}
    for other, entry in sorted(registry.items()):
        online = entry.get("is_online", True)
        theirs = served(entry["shard_info"]) if other != name and online else None
        if theirs is not None and theirs != what:
            others.setdefault(_text(theirs), []).append(other)
    if not others:
        return None
    listed = "; ".join(f"{', '.join(names)} serve{'s' if len(names) == 1 else ''} {text}"
                       for text, names in others.items())
    return (f"refused {name}: it serves {_text(what)}, but {listed}: give every envoy the same dataset and size "
            "(its config's flag and size, and a file of that dataset)")


def same_data(acknowledge_shard):
    """Director.acknowledge_shard that refuses an envoy serving other data than the registered envoys."""

    def wrapper(self, shard_info):
        name = shard_info["node_info"]["name"]
        why = mismatch(name, served(shard_info), self._shard_registry)
        if why:
            logger.error("%s", why)
            return False
        return acknowledge_shard(self, shard_info)

    return wrapper


def explaining_refusal(report_shard_info):
    """DirectorClient.report_shard_info whose refusal the envoy explains before OpenFL stops it."""

    def wrapper(self, *args, **kwargs):
        accepted = report_shard_info(self, *args, **kwargs)
        if not accepted:
            logger.error("The director refused this envoy: its images or labels have other shapes than the "
                         "director's config, or it serves other data than the envoys already registered (the "
                         "director's log says which); fix this envoy's config or file and start it again")
        return accepted

    return wrapper


def install() -> None:
    """Compare each registering envoy's data with the others'; an envoy refused says why it may have been."""
    from openfl.component.director.director import Director
    from openfl.transport.grpc.director_client import ShardDirectorClient

    replace(Director, "acknowledge_shard", same_data)
    replace(ShardDirectorClient, "report_shard_info", explaining_refusal)

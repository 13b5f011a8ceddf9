"""The layer registry: trained conv prefixes, keyed by prefix signature, with donor metadata.

Layout in the object store (an entry is visible once its meta.json exists; weights go first):

    layers/<signature key>/signature.json
    layers/<signature key>/<study>-t<trial>-<sha>/weights.pt     (a torch state dict, weights_only)
    layers/<signature key>/<study>-t<trial>-<sha>/meta.json      (DonorMeta, with the weights' sha256)

This module moves bytes and metadata; strata_trainer.checkpoints turns tensors into bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from strata.families import PrefixSignature
from strata.objectstore import ObjectInfo, ObjectNotFound, ObjectStore, ObjectStoreError

log = logging.getLogger(__name__)
ROOT = "layers"


class CorruptCheckpoint(ObjectStoreError):
    """The stored weights do not match the sha256 recorded for them."""


@dataclass(frozen=True)
class DonorMeta:
    signature_key: str
    depth: int
    study: str
    trial_number: int
    val_loss: float
    epochs: int
    sha256: str
    size: int
    created: float

    @property
    def entry(self) -> str:
        # The sha makes each attempt's entry unique: re-publishing never overwrites committed weights.
        return f"{ROOT}/{self.signature_key}/{self.study}-t{self.trial_number}-{self.sha256[:12]}"

    @property
    def weights_key(self) -> str:
        return f"{self.entry}/weights.pt"


class LayerRegistry:
    def __init__(self, store: ObjectStore):
        self.store = store
        # Committed entries are immutable (the name carries the weights' sha256), so each meta.json is read
        # once per process: a lookup costs one LIST of its signature, not one GET per donor.
        self._metas: dict[tuple[str, int], DonorMeta] = {}

    def publish(self, signature: PrefixSignature, weights: bytes, *, study: str, trial_number: int,
                val_loss: float, epochs: int) -> DonorMeta:
        meta = DonorMeta(
            signature_key=signature.key, depth=signature.depth, study=study, trial_number=trial_number,
            val_loss=float(val_loss), epochs=int(epochs), sha256=hashlib.sha256(weights).hexdigest(),
            size=len(weights), created=time.time(),
        )
        self.store.put_bytes(f"{ROOT}/{signature.key}/signature.json",
                             json.dumps(signature.canonical(), sort_keys=True).encode())
        self.store.put_bytes(meta.weights_key, weights)
        self.store.put_bytes(f"{meta.entry}/meta.json", json.dumps(asdict(meta), sort_keys=True).encode())
        return meta

    def donors(self, signature: PrefixSignature) -> list[DonorMeta]:
        """Every committed entry for this signature (entries without meta.json are invisible)."""
        metas = (self._meta(info) for info in self.store.list(f"{ROOT}/{signature.key}/")
                 if info.key.endswith("/meta.json"))
        return [meta for meta in metas if meta is not None]

    def _meta(self, info: ObjectInfo) -> DonorMeta | None:
        """A committed entry's metadata, read once per process (None if unreadable)."""
        cached = self._metas.get((info.key, info.size))
        if cached is not None:
            return cached
        try:
            meta = DonorMeta(**json.loads(self.store.get_bytes(info.key)))
        except (ObjectNotFound, ValueError, TypeError) as error:
            log.warning("skipping unreadable donor metadata %s: %s", info.key, error)
            return None
        self._metas[(info.key, info.size)] = meta
        return meta

    def best_donor(self, signature: PrefixSignature, min_epochs: int = 1,
                   exclude: set[str] | None = None) -> DonorMeta | None:
        """The donor with the lowest validation loss among those trained at least min_epochs."""
        usable = [d for d in self.donors(signature)
                  if d.epochs >= min_epochs and d.val_loss == d.val_loss and d.entry not in (exclude or set())]
        return min(usable, key=lambda d: (d.val_loss, d.created), default=None)

    def has_donor(self, signature: PrefixSignature, min_epochs: int = 1) -> bool:
        return self.best_donor(signature, min_epochs) is not None

    def load_weights(self, donor: DonorMeta) -> bytes:
        data = self.store.get_bytes(donor.weights_key)
        digest = hashlib.sha256(data).hexdigest()
        if digest != donor.sha256:
            raise CorruptCheckpoint(f"{donor.weights_key}: sha256 {digest[:12]} != recorded {donor.sha256[:12]}")
        return data

    def usage(self, study: str | None = None) -> tuple[int, int]:
        """(objects, bytes) of the weights in the registry, or of those one study published."""
        listing = list(self.store.list(f"{ROOT}/"))
        entries = self._entries_of(study, listing) if study is not None else None
        weights = [info for info in listing if info.key.endswith("/weights.pt")
                   and (entries is None or info.key.rsplit("/", 1)[0] in entries)]
        return len(weights), sum(info.size for info in weights)

    def remove_study(self, study: str) -> int:
        """Delete the entries a study published (meta.json first: a half-removed entry is invisible)."""
        entries = self._entries_of(study, self.store.list(f"{ROOT}/"))
        for entry in sorted(entries):
            self.store.delete(f"{entry}/meta.json")
            self.store.delete(f"{entry}/weights.pt")
        return len(entries)

    def _entries_of(self, study: str, listing: Iterable[ObjectInfo]) -> set[str]:
        # Entry names start with "<study>-t"; the metadata decides (another study's name may share that start).
        candidates = [info for info in listing if info.key.endswith("/meta.json")
                      and info.key.rsplit("/", 2)[-2].startswith(f"{study}-t")]
        return {info.key.rsplit("/", 1)[0] for info in candidates
                if (meta := self._meta(info)) is not None and meta.study == study}

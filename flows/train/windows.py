"""Training data: checks a dataset directory, and reads deterministic batches from its token shards.

What it is: the reader side of the dataset-directory contract (``manifest.json``, ``tokenizer.json``,
flat little-endian token shards, uint8 loss-mask files for the ``sft`` split). The driver calls
flows.data.dataset.check_dataset before any worker starts; each worker opens a :class:`TokenWindows` and asks
for the batch of a (step, micro-batch) -- a pure function of (seed, step, rank), so a resumed run sees
exactly the batches an uninterrupted run would.

What it is not: preprocessing (flows/data/stage.py writes these directories), nor a general
data-loading framework. Sequences are fixed windows of ``context_length + 1`` tokens laid end to end
over each shard (documents are packed; ``<|endoftext|>`` separates them), dealt round-robin to ranks,
so the ranks read disjoint windows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from flows.data.dataset import DTYPES, DataError, read_manifest

log = logging.getLogger(__name__)


class TokenWindows:
    """The windows of one split that belong to one rank, and deterministic batches drawn from them.

    Window ``w`` of a shard covers tokens ``[w*T, w*T + T + 1)``; the windows of all shards are
    numbered in manifest order and rank ``r`` of ``world`` owns those with ``index % world == r``. On
    the ``sft`` split, windows whose targets carry no loss-mask bit are dropped (they would give an
    empty loss).
    """

    def __init__(self, dataset: str | Path, split: str, context_length: int, rank: int = 0, world: int = 1):
        root = Path(dataset)
        manifest = read_manifest(root)
        dtype = DTYPES[manifest["dtype"]]
        self.T = context_length
        self.split = split
        self.masked = split in ("sft", "sft_val")  # fine-tuning examples: the loss counts completions only
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray | None] = []
        owned: list[tuple[int, int]] = []  # (shard index, window start)
        index = 0
        for si, shard in enumerate(manifest["splits"][split]["shards"]):
            toks = np.memmap(root / shard["file"], dtype=dtype, mode="r")
            mask = np.memmap(root / shard["mask_file"], dtype=np.uint8, mode="r") if self.masked else None
            self._tokens.append(toks)
            self._masks.append(mask)
            n = (len(toks) - 1) // self.T
            for w in range(n):
                if index % world == rank and (mask is None or mask[w * self.T + 1 : w * self.T + self.T + 1].any()):
                    owned.append((si, w * self.T))
                index += 1
        if not owned:
            raise DataError(f"{root}: split {split!r} has no {context_length + 1}-token window for rank {rank} of {world}")
        self._owned = np.asarray(owned, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._owned)

    def window_ids(self, seed: int, start: int, count: int) -> np.ndarray:
        """Indices (into this rank's windows) of samples ``start .. start+count-1`` of an endless stream.

        The stream walks a fresh permutation of the windows per epoch; sample ``c`` is a function of
        (seed, rank's windows, c) alone, which is what makes resumption exact.
        """
        n = len(self._owned)
        out = np.empty(count, dtype=np.int64)
        perms: dict[int, np.ndarray] = {}
        for i in range(count):
            c = start + i
            epoch = c // n
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
            out[i] = perms[epoch][c % n]
        return out

    def batch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(inputs, targets, loss_mask or None) as int64/bool arrays of shape (len(ids), T)."""
        x = np.empty((len(ids), self.T + 1), dtype=np.int64)
        m = np.empty((len(ids), self.T + 1), dtype=bool) if self.masked else None
        for row, wid in enumerate(ids):
            si, start = self._owned[wid]
            x[row] = self._tokens[si][start : start + self.T + 1]
            if m is not None:
                m[row] = self._masks[si][start : start + self.T + 1]
        # The mask marks tokens to learn; a target at position t is token t+1, hence the shift.
        return x[:, :-1], x[:, 1:], (m[:, 1:] if m is not None else None)

    def train_batch(self, seed: int, step: int, micro: int, grad_accum: int, micro_batch_size: int):
        """The batch of micro-batch `micro` of optimizer step `step` (steps count from 0)."""
        start = (step * grad_accum + micro) * micro_batch_size
        return self.batch(self.window_ids(seed, start, micro_batch_size))

    def eval_batches(self, num_batches: int, micro_batch_size: int, limit: int | None = None):
        """The first windows of this rank in order: the same validation set at every evaluation.

        `limit` caps the windows; pass the minimum over ranks so every rank runs the same number of
        forwards (under ZeRO-3 each forward is a collective, and unequal counts hang).
        """
        total = min(len(self), num_batches * micro_batch_size, limit if limit is not None else len(self))
        for i in range(0, total, micro_batch_size):
            yield self.batch(np.arange(i, min(i + micro_batch_size, total)))

"""Training data: deterministic batches of fixed windows over a dataset directory's token shards.

What it is: the reader side of the dataset-directory contract (``manifest.json``,
``tokenizer.json``, flat little-endian token shards, uint8 loss-mask files for the ``sft`` splits).
The driver calls flows.data.dataset.check_dataset before any worker starts; each worker opens a
:class:`TokenWindows` and asks for the batch of a (step, micro-batch) -- a pure function of (seed,
step, rank), so a resumed run sees exactly the batches an uninterrupted run would.

What it is not: preprocessing (flows/data/stage.py writes these directories), nor a general
data-loading framework. Sequences are fixed windows of ``context_length + 1`` tokens laid end to end
over each shard (documents are packed; ``<|endoftext|>`` separates them), dealt round-robin to
ranks, so the ranks read disjoint windows.

Why it is arithmetic.  A window is a number, not an object: window ``g`` lives in the shard whose
first-window offset is the last one <= ``g``, at token ``(g - first) * T``. The order in which a
rank visits its windows is a keyed bijection of ``[0, n)`` per epoch (:func:`permute`), evaluated
only at the positions a batch asks for. Opening a 10 B-token dataset therefore costs a few memmaps
and an array of shard offsets -- no per-window Python objects, no per-epoch permutation array (an
80 MB int64 array per rank per epoch at 10 B tokens and T=1024, 600 MB at T=128), nothing
re-shuffled per micro-batch. Only the masked fine-tuning splits, which are small, keep an index
array: the ids of the windows that have a loss-mask bit, found by one chunked numpy pass over the
mask files.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from flows.data.dataset import DTYPES, DataError, read_manifest

log = logging.getLogger(__name__)

MASKED_SPLITS = ("sft", "sft_val")

# Tokens of a mask file looked at per numpy call when finding the windows that have a loss-mask bit:
# bounds the temporaries of the pass (a few MB) whatever the shard size.
_MASK_CHUNK_TOKENS = 1 << 22

# Four is the Luby-Rackoff bound for a strong pseudo-random permutation from a pseudo-random round
# function; every round is ~10 numpy calls per batch, the cost that matters at a few dozen
# positions.
_FEISTEL_ROUNDS = 4


@lru_cache(maxsize=16)
def _round_keys(seed: int, epoch: int) -> tuple[np.ndarray, ...]:
    """The Feistel round keys of one epoch's order: derived once per (seed, epoch), then cached."""
    keys = np.random.SeedSequence([seed, epoch]).generate_state(_FEISTEL_ROUNDS, dtype=np.uint64)
    return tuple(np.array(k, dtype=np.uint64) for k in keys)


# uint64 constants as 0-d arrays: numpy's fast path (a numpy scalar operand costs several times
# more).
_U = {v: np.array(v, dtype=np.uint64) for v in (27, 30, 31, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)}


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast uint64 -> uint64 hash whose every output bit depends on every
    input bit."""
    z = (z ^ (z >> _U[30])) * _U[0xBF58476D1CE4E5B9]
    z = (z ^ (z >> _U[27])) * _U[0x94D049BB133111EB]
    return z ^ (z >> _U[31])


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Where positions ``0 <= p < n`` of epoch `epoch` go under a bijection of ``[0, n)`` keyed by
    (seed, epoch).

    A balanced Feistel network over the smallest even number of bits that covers ``n`` is a
    bijection of ``[0, 2**bits)``; "cycle walking" (apply it again while the result is ``>= n``)
    restricts it to a bijection of ``[0, n)``, at fewer than four passes through the network per
    position on average (``2**bits < 4n``). Four rounds of a splitmix64-keyed round function are
    plenty for a data order. Cost: O(len(positions)) time and O(1) memory in n, where
    ``default_rng((seed, epoch)).permutation(n)`` takes 8n bytes and O(n) time per epoch.
    """
    if n <= 0:
        raise ValueError(f"n={n}: nothing to permute")
    x = np.asarray(positions, dtype=np.uint64)
    h = max(1, ((n - 1).bit_length() + 1) // 2)  # bits per half: 2**(2h) >= n
    half, low, size = (np.array(v, dtype=np.uint64) for v in (h, (1 << h) - 1, n))
    keys = _round_keys(seed, epoch)

    def network(v: np.ndarray) -> np.ndarray:
        left, right = v >> half, v & low
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & low)
        return (left << half) | right

    y = network(x)
    outside = np.flatnonzero(y >= size)
    while outside.size:  # terminates: the walk stays on the cycle of a position < n
        y[outside] = network(y[outside])
        outside = outside[y[outside] >= size]
    return y.astype(np.int64)


def _windows_with_mask(mask: np.ndarray, n: int, T: int) -> np.ndarray:
    """Which of a shard's `n` windows have a loss-mask bit among their targets (tokens
    w*T+1 .. w*T+T)."""
    out = np.empty(n, dtype=bool)
    step = max(1, _MASK_CHUNK_TOKENS // T)
    for a in range(0, n, step):
        b = min(n, a + step)
        targets = mask[a * T + 1 : b * T + 1].reshape(
            b - a, T
        )  # a view of the memmap: nothing copied
        out[a:b] = targets.max(axis=1) > 0  # a uint8 reduction: no bool copy of the block
    return out


class TokenWindows:
    """The windows of one split that belong to one rank, and deterministic batches drawn from them.

    Window ``w`` of a shard covers tokens ``[w*T, w*T + T + 1)``; the windows of all shards are
    numbered in manifest order and rank ``r`` of ``world`` owns those with ``index % world == r``.
    On the masked splits (``sft``, ``sft_val``), windows whose targets carry no loss-mask bit are
    dropped (they would give an empty loss). A rank's windows are numbered ``0 .. len-1`` in that
    order.
    """

    def __init__(
        self, dataset: str | Path, split: str, context_length: int, rank: int = 0, world: int = 1
    ):
        root = Path(dataset)
        manifest = read_manifest(root, (split,))
        dtype = DTYPES[manifest["dtype"]]
        self.T = T = context_length
        self.split = split
        self.rank, self.world = rank, world
        self.masked = (
            split in MASKED_SPLITS
        )  # fine-tuning examples: the loss counts completions only
        shards = manifest["splits"][split]["shards"]
        self._tokens = [_open(root / s["file"], dtype, s["tokens"]) for s in shards]
        self._masks = [
            _open(root / s["mask_file"], np.uint8, s["tokens"]) if self.masked else None
            for s in shards
        ]
        counts = [max(0, (len(t) - 1) // T) for t in self._tokens]
        # Global index of each shard's first window (and the total last): the whole unmasked index.
        self._first = np.cumsum([0, *counts], dtype=np.int64)
        self._ids: np.ndarray | None = (
            None  # masked splits: the global ids this rank owns, ascending
        )
        if self.masked:
            owned = []
            for si, (mask, n) in enumerate(zip(self._masks, counts, strict=True)):
                g = self._first[si] + np.flatnonzero(_windows_with_mask(mask, n, T))
                owned.append(g[g % world == rank])
            self._ids = np.concatenate(owned) if owned else np.empty(0, dtype=np.int64)
            self._n = len(self._ids)
            dropped = (int(self._first[-1]) - rank + world - 1) // world - self._n
            if dropped:
                log.info(
                    "%s: %d of rank %d's %d-token windows have no loss-mask bit and are left out",
                    split,
                    dropped,
                    rank,
                    T + 1,
                )
        else:
            self._n = max(0, (int(self._first[-1]) - rank + world - 1) // world)
        if not self._n:
            raise DataError(
                f"{root}: split {split!r} has no {context_length + 1}-token window for rank {rank} "
                f"of {world}"
            )

    def __len__(self) -> int:
        return self._n

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, first token) of this rank's windows `ids`."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self._n):
            raise IndexError(f"window ids must be in [0, {self._n}), got {ids.min()}..{ids.max()}")
        g = self._ids[ids] if self._ids is not None else ids * self.world + self.rank
        shard = (
            np.searchsorted(self._first, g, side="right") - 1
        )  # the last shard starting at or before g
        return shard, (g - self._first[shard]) * self.T

    def window_ids(self, seed: int, start: int, count: int) -> np.ndarray:
        """Indices (into this rank's windows) of samples ``start .. start+count-1`` of an endless
        stream.

        Epoch ``e`` is samples ``e*n .. e*n+n-1`` (n = this rank's windows): each window once, in an
        order keyed by (seed, e). Sample ``c`` is a function of (seed, this rank's windows, c)
        alone, which is what makes resumption exact.
        """
        c = np.arange(start, start + count, dtype=np.int64)
        epoch, pos = np.divmod(c, self._n)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epoch):  # one or two epochs per batch
            sel = epoch == e
            out[sel] = permute(pos[sel], self._n, seed, int(e))
        return out

    def batch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(inputs, targets, loss_mask or None) as int64/bool arrays of shape (len(ids), T)."""
        shards, starts = self.locate(ids)
        x = np.empty((len(shards), self.T + 1), dtype=np.int64)
        m = np.empty((len(shards), self.T + 1), dtype=bool) if self.masked else None
        for row, (si, start) in enumerate(zip(shards.tolist(), starts.tolist(), strict=True)):
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
        total = min(
            len(self), num_batches * micro_batch_size, limit if limit is not None else len(self)
        )
        for i in range(0, total, micro_batch_size):
            yield self.batch(np.arange(i, min(i + micro_batch_size, total)))


def _open(path: Path, dtype: type, tokens: int) -> np.ndarray:
    """A read-only memmap of a shard (numpy cannot map an empty file: an empty array instead)."""
    little = np.dtype(dtype).newbyteorder("<")  # the contract's byte order, whatever this machine's
    return np.memmap(path, dtype=little, mode="r") if tokens else np.empty(0, dtype=little)

"""The training data index (flows/train/windows.py), fast and without Ray: windows tile the shards
exactly as the per-window definition says, ranks split them, each epoch visits every window once in
its own deterministic order, masked splits drop only windows without a loss-mask bit, and opening a
billion-token dataset costs a bounded amount of memory.

Datasets here are hand-written: token ``i`` of shard ``s`` is ``s * 100_000 + i`` (uint32), so a
window's tokens say where it came from.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from flows.data.dataset import FORMAT_VERSION, DataError
from flows.train.windows import TokenWindows, permute


def _dataset(
    root: Path, splits: dict[str, list[tuple[np.ndarray, np.ndarray | None]]], dtype: str = "uint32"
) -> Path:
    """A dataset directory with the given (tokens, mask or None) shards per split."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text("{}")  # the reader checks it exists; batches never decode
    entries: dict = {}
    for split, shards in splits.items():
        listed = []
        for i, (tokens, mask) in enumerate(shards):
            entry = {"file": f"{split}/{i:05d}.bin", "tokens": len(tokens)}
            (root / split).mkdir(exist_ok=True)
            tokens.astype(dtype).tofile(root / entry["file"])
            if mask is not None:
                entry["mask_file"] = f"{split}/{i:05d}.mask.bin"
                mask.astype(np.uint8).tofile(root / entry["mask_file"])
            listed.append(entry)
        entries[split] = {"shards": listed, "tokens": sum(len(t) for t, _ in shards)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": 2**31,
        "eot_id": 0,
        "splits": entries,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _shard(s: int, n: int) -> np.ndarray:
    return s * 100_000 + np.arange(n)


def _reference(
    shards: list[tuple[np.ndarray, np.ndarray | None]], T: int, rank: int, world: int
) -> list[tuple[int, int]]:
    """The windows a rank owns, by the definition (the per-window loop the index replaced)."""
    owned, index = [], 0
    for si, (tokens, mask) in enumerate(shards):
        for w in range((len(tokens) - 1) // T):
            if index % world == rank and (mask is None or mask[w * T + 1 : w * T + T + 1].any()):
                owned.append((si, w * T))
            index += 1
    return owned


# Shard lengths around the window edges: a remainder, an exact fit (T*k + 1), one shorter than a
# window.
TRAIN = [_shard(0, 16 * 37 + 5), _shard(1, 16 * 3 + 1), _shard(2, 10), _shard(3, 16 * 20 + 15)]


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory.mktemp("w") / "ds", {"train": [(t, None) for t in TRAIN]})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_windows_tile_each_shard_as_defined(train_dir, world):
    T = 16
    for rank in range(world):
        data = TokenWindows(train_dir, "train", T, rank, world)
        expected = _reference([(t, None) for t in TRAIN], T, rank, world)
        shards, starts = data.locate(np.arange(len(data)))
        assert list(zip(shards.tolist(), starts.tolist(), strict=True)) == expected
        x, y, m = data.batch(np.arange(len(data)))
        assert m is None and x.shape == (len(expected), T)
        for row, (si, start) in enumerate(expected):
            assert np.array_equal(
                np.concatenate([x[row], y[row, -1:]]), TRAIN[si][start : start + T + 1]
            )


def test_ranks_are_disjoint_and_cover_every_window(train_dir):
    T, world = 16, 3
    seen = []
    for rank in range(world):
        data = TokenWindows(train_dir, "train", T, rank, world)
        shards, starts = data.locate(np.arange(len(data)))
        seen.append(set(zip(shards.tolist(), starts.tolist(), strict=True)))
    assert all(seen) and not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set().union(*seen) == set(_reference([(t, None) for t in TRAIN], T, 0, 1))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_each_epoch_is_a_permutation_of_its_own(n):
    orders = [permute(np.arange(n), n, seed=3, epoch=e) for e in range(3)]
    for order in orders:
        assert np.array_equal(
            np.sort(order), np.arange(n)
        )  # every position lands once: a bijection
    if n >= 64:
        assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
        assert not np.array_equal(orders[0], permute(np.arange(n), n, seed=4, epoch=0))
    assert np.array_equal(orders[0], permute(np.arange(n), n, seed=3, epoch=0))


def test_an_epoch_order_is_shuffled_not_structured():
    n = 10_000
    order = permute(np.arange(n), n, seed=0, epoch=0)
    # No trend and no locality: neighbouring positions are not neighbouring windows. (Deterministic
    # for this seed; an identity, affine or reversed order fails both.)
    assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.05
    assert np.mean(np.abs(np.diff(order)) < 10) < 0.01


def test_batches_are_a_function_of_seed_step_rank(train_dir):
    r0 = TokenWindows(train_dir, "train", 16, rank=0, world=2)
    again = TokenWindows(train_dir, "train", 16, rank=0, world=2)
    x, y, m = r0.train_batch(seed=3, step=7, micro=1, grad_accum=2, micro_batch_size=4)
    x2, y2, _ = again.train_batch(seed=3, step=7, micro=1, grad_accum=2, micro_batch_size=4)
    assert m is None and x.shape == (4, 16) and np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    other_step, _, _ = r0.train_batch(seed=3, step=8, micro=1, grad_accum=2, micro_batch_size=4)
    other_seed, _, _ = r0.train_batch(seed=4, step=7, micro=1, grad_accum=2, micro_batch_size=4)
    assert not np.array_equal(x, other_step) and not np.array_equal(x, other_seed)


def test_the_stream_visits_every_window_once_per_epoch(train_dir):
    data = TokenWindows(train_dir, "train", 16, rank=1, world=2)
    n = len(data)
    epochs = [data.window_ids(5, e * n, n) for e in range(3)]
    for ids in epochs:
        assert np.array_equal(np.sort(ids), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    # A batch across an epoch boundary is the end of one epoch and the start of the next, and a
    # read far into the stream needs nothing before it (a resumed run starts there).
    assert np.array_equal(
        data.window_ids(5, n - 3, 6), np.concatenate([epochs[0][-3:], epochs[1][:3]])
    )
    assert np.array_equal(data.window_ids(5, 2 * n + 4, 3), epochs[2][4:7])
    # A batch is the windows its ids name.
    x, _, _ = data.batch(epochs[0][:2])
    shards, starts = data.locate(epochs[0][:2])
    assert all(
        np.array_equal(x[i], TRAIN[s][a : a + 16])
        for i, (s, a) in enumerate(zip(shards, starts, strict=True))
    )


def test_masked_split_drops_only_windows_without_a_mask_bit(tmp_path):
    T = 8
    masks = [np.zeros(8 * 40 + 3, dtype=np.uint8), np.zeros(8 * 5 + 1, dtype=np.uint8)]
    masks[0][8 * 3 + 1] = 1  # window 3's first target
    masks[0][8 * 5 + 8] = 1  # window 5's last target (it is also window 6's first input)
    masks[0][8 * 9] = 1  # only an input of window 9 (and the last target of 8)
    masks[0][8 * 20 + 2 : 8 * 23] = 1  # windows 20-22
    masks[1][1:] = 1  # every window of the second shard
    shards = [(_shard(0, len(masks[0])), masks[0]), (_shard(1, len(masks[1])), masks[1])]
    root = _dataset(tmp_path / "sft", {"sft": shards})
    kept = set()
    for rank in range(2):
        data = TokenWindows(root, "sft", T, rank, 2)
        expected = _reference(shards, T, rank, 2)
        got = list(zip(*(a.tolist() for a in data.locate(np.arange(len(data)))), strict=True))
        assert got == expected
        kept |= set(got)
        x, y, m = data.batch(np.arange(len(data)))
        assert m is not None and m.any(axis=1).all()  # every window left has something to learn
        for row, (si, start) in enumerate(expected):
            assert np.array_equal(m[row], masks[si][start + 1 : start + T + 1].astype(bool))
    first = {start // T for si, start in kept if si == 0}
    assert first == {3, 5, 8, 20, 21, 22} and {s for s, _ in kept} == {0, 1}


def test_an_empty_rank_is_a_clear_error(tmp_path):
    root = _dataset(tmp_path / "one", {"train": [(_shard(0, 17), None)]})
    TokenWindows(root, "train", 16, 0, 2)
    with pytest.raises(DataError, match=r"no 17-token window for rank 1 of 2"):
        TokenWindows(root, "train", 16, 1, 2)


def _sparse_dataset(
    root: Path, split: str, tokens: list[int], mask_bits: dict[int, list[int]] | None = None
) -> Path:
    """A dataset of all-zero uint16 shards stored as sparse files (no disk, no page cache until
    read)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text("{}")
    (root / split).mkdir()
    listed = []
    for i, n in enumerate(tokens):
        entry = {"file": f"{split}/{i:05d}.bin", "tokens": n}
        with open(root / entry["file"], "wb") as f:
            f.truncate(2 * n)
        if mask_bits is not None:
            entry["mask_file"] = f"{split}/{i:05d}.mask.bin"
            with open(root / entry["mask_file"], "wb") as f:
                f.truncate(n)
                for pos in mask_bits.get(i, []):
                    f.seek(pos)
                    f.write(b"\x01")
        listed.append(entry)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "vocab_size": 50257,
        "eot_id": 0,
        "splits": {split: {"shards": listed, "tokens": sum(tokens)}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_index_of_a_billion_tokens_is_small(tmp_path):
    T, world = 512, 2  # ~977k windows per rank: an int64 array of them alone would be 7.5 MiB
    tokens = [400_000_000, 350_000_000, 250_000_001]
    root = _sparse_dataset(tmp_path / "big", "train", tokens)
    TokenWindows(root, "train", T, 0, world).train_batch(
        0, 0, 0, 1, 8
    )  # numpy's lazy imports, untraced
    tracemalloc.start()
    try:
        data = TokenWindows(root, "train", T, rank=1, world=world)
        x, y, _ = data.train_batch(seed=0, step=10**6, micro=0, grad_accum=1, micro_batch_size=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The per-window index held a tuple per window (~100 MB here) and re-permuted them for every
    # batch.
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB"
    windows = sum((n - 1) // T for n in tokens)
    assert len(data) == (windows - 1 + world - 1) // world and x.shape == (8, T) and not x.any()
    shard, start = data.locate(
        np.array([len(data) - 1])
    )  # global window (len-1)*world + 1, in the last shard
    before = sum((n - 1) // T for n in tokens[:2])
    assert (int(shard[0]), int(start[0])) == (2, ((len(data) - 1) * world + 1 - before) * T)


def test_masked_index_pass_has_bounded_temporaries(tmp_path):
    T = 64
    n = 20_000_000
    last = (n - 1) // T - 1  # the last whole window; the tail after it belongs to none
    # Token 0 is an input only, n-1 in the tail; the others are targets of windows 7, 100000 and the
    # last.
    bits = [0, T * 7 + 1, T * 100_000 + 5, last * T + T, n - 1]
    root = _sparse_dataset(tmp_path / "sftbig", "sft", [n], {0: bits})
    tracemalloc.start()
    try:
        data = TokenWindows(root, "sft", T)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, (
        f"{peak / 2**20:.1f} MiB"
    )  # a bool per window (0.3 MB) + one chunk's maxima
    assert data.locate(np.arange(len(data)))[1].tolist() == [7 * T, 100_000 * T, last * T]

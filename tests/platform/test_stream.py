"""The training stream: epoch order from (seed, epoch), repeats/weights honoured, exact resume mid-epoch."""

import numpy as np
import pyarrow as pa
import pytest

from cytoray.platform.config import load_preset
from cytoray.platform.data.stream import (
    EpochOrder,
    ManifestError,
    MultiCropBatches,
    StreamConfig,
    batch_positions,
    build_stream,
    epoch_permutation,
    expand_repeats,
    iter_steps,
    read_manifest,
)
from cytoray.testing import write_cell_manifest


def test_repeats_and_weights_set_the_epoch():
    assert expand_repeats(pa.table({"uri": list("abc"), "repeats": [2, 0, 1]})).tolist() == [0, 0, 2]
    # weights -> integer repeats keeping the epoch at the manifest's size (largest remainder)
    idx = expand_repeats(pa.table({"uri": list("abcd"), "weight": [0.5, 0.25, 0.25, 0.0]}))
    assert np.bincount(idx, minlength=4).tolist() == [2, 1, 1, 0]
    assert expand_repeats(pa.table({"uri": list("ab")})).tolist() == [0, 1]
    with pytest.raises(ManifestError, match="negative"):
        expand_repeats(pa.table({"uri": ["a"], "repeats": [-1]}))
    with pytest.raises(ManifestError, match="repeats=0"):
        expand_repeats(pa.table({"uri": ["a"], "repeats": [0]}))


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = epoch_permutation(100, 0, 0), epoch_permutation(100, 0, 1)
    assert sorted(a.tolist()) == list(range(100)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_permutation(100, 0, 0)) and not np.array_equal(a, epoch_permutation(100, 1, 0))
    order = EpochOrder(np.arange(10), seed=3)
    first_two_epochs = order.rows(np.arange(20))
    assert sorted(first_two_epochs[:10].tolist()) == list(range(10)) == sorted(first_two_epochs[10:].tolist())
    # ranks take disjoint, consecutive slices of the global order
    assert batch_positions(32, 8, 0).tolist() == list(range(32, 40))
    assert batch_positions(32, 8, 1).tolist() == list(range(40, 48))


def test_bad_manifest_is_named(tmp_path):
    with pytest.raises(ManifestError, match="cannot be read"):
        read_manifest(str(tmp_path / "missing.parquet"))
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_id": ["a"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['uri'\]"):
        read_manifest(str(tmp_path / "m.parquet"))


def test_stream_resumes_exactly_mid_epoch(ray_local, tmp_path):
    manifest = write_cell_manifest(str(tmp_path / "cells"), 12, repeats=[1] * 11 + [3])  # epoch = 14 samples
    aug = load_preset("debug").augment
    cfg = StreamConfig(manifest_uri=manifest, num_cpus=0.25)

    def run(rank, start, end, consumed):
        ds = build_stream(cfg, None, aug, seed=7, batch_size=3, world_size=2, rank=rank, start_step=start,
                          end_step=end, start_samples=consumed)
        return list(iter_steps(ds, prefetch_batches=1))

    full = run(1, 0, 5, 0)
    assert [s for s, _ in full] == [0, 1, 2, 3, 4]
    assert [b["positions"].tolist() for _, b in full][:2] == [[3, 4, 5], [9, 10, 11]]
    assert full[0][1]["global_crops"].shape == (2, 3, 3, 64, 64) and full[0][1]["local_crops"].shape == (2, 3, 3, 32, 32)
    resumed = run(1, 3, 5, 3 * 6)  # restart at step 3: 18 samples consumed (epoch 1, position 4)
    for (s_full, b_full), (s_res, b_res) in zip(full[3:], resumed):
        assert s_full == s_res
        assert np.array_equal(b_full["positions"].numpy(), b_res["positions"].numpy())
        assert np.array_equal(b_full["global_crops"].numpy(), b_res["global_crops"].numpy())  # same crops too
    # the row repeated 3x appears 3x in each epoch of 14 samples
    order = EpochOrder(expand_repeats(read_manifest(manifest)), seed=7)
    assert np.bincount(order.rows(np.arange(14)), minlength=12).tolist() == [1] * 11 + [3]


def test_every_actor_of_the_pool_builds_steps_in_order(ray_local, tmp_path):
    """One block per step: a 2-actor pool spreads the steps over both actors, the order and crops unchanged."""
    manifest = write_cell_manifest(str(tmp_path / "cells"), 6)
    aug = load_preset("debug").augment
    args = dict(seed=5, batch_size=2, world_size=2, rank=1, start_step=0, start_samples=0)
    ds = build_stream(StreamConfig(manifest_uri=manifest, num_actors=2, num_cpus=0.25), None, aug, end_step=8,
                      **args)
    ds.context.wait_for_min_actors_s = 120  # both actors up before the first step is handed out
    batches = list(ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1))
    assert [int(b["step"][0]) for b in batches] == list(range(8))
    assert len({int(b["worker"][0]) for b in batches}) == 2  # both actors built steps
    direct = MultiCropBatches(manifest, None, aug, **args)  # the same steps built in this process
    for b in batches:
        expected = direct({"step": b["step"]})
        assert np.array_equal(b["positions"], expected["positions"])
        assert np.array_equal(b["global_crops"], expected["global_crops"])
    empty = build_stream(StreamConfig(manifest_uri=manifest), None, aug, end_step=0, **args)
    assert list(iter_steps(empty)) == []  # a run resumed at its last step streams nothing

"""Seeded k-means, ISODATA split/merge by hand and nearest-centre labelling (stf_pipeline.kernels.classify)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stf_pipeline.exceptions import MethodError
from stf_pipeline.kernels.classify import (
    isodata,
    kmeans,
    merge_clusters,
    nearest_centre,
    nearest_centre_jax,
    split_clusters,
)


def test_kmeans_is_seeded_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    truth = np.array([[0.1, 0.2], [0.5, 0.1], [0.3, 0.6]])
    x = np.concatenate([c + rng.normal(0, 0.01, (200, 2)) for c in truth])
    a = kmeans(x, 3, seed=3)
    np.testing.assert_array_equal(a, kmeans(x, 3, seed=3))
    np.testing.assert_allclose(a, truth[np.lexsort(truth.T[::-1])], atol=0.005)
    labels = nearest_centre(np.array([[0.1, np.nan], [0.2, 0.2]]), a)
    assert labels[1] == -1 and labels[0] >= 0


def test_kmeans_too_many_classes_is_a_clear_error():
    with pytest.raises(MethodError, match="n_classes=4"):
        kmeans(np.array([[0.1, 0.1], [0.2, 0.2], [0.1, 0.1]]), 4)


def test_isodata_split_by_hand():
    # one cluster, band 1 spread sigma = 0.1 > split_std: two centres at mean -/+ 1 sigma in band 1;
    # the other (sigma 0.01) stays
    x = np.array([[0.0, -0.1], [0.0, 0.1], [1.0, 0.99], [1.0, 1.01]])
    centres = np.array([[0.0, 0.0], [1.0, 1.0]])
    got = split_clusters(x, np.array([0, 0, 1, 1]), centres, max_new=4, split_std=0.05, split_mult=1.0)
    np.testing.assert_allclose(got, [[0.0, -0.1], [1.0, 1.0], [0.0, 0.1]])
    none = split_clusters(x, np.array([0, 0, 1, 1]), centres, max_new=0, split_std=0.05, split_mult=1.0)
    np.testing.assert_array_equal(none, centres)


def test_isodata_merge_by_hand():
    # pairs closer than 0.05: (0, 1) at 0.01 and (2, 3) at 0.02, merged into count-weighted means,
    # closest first; max_pairs and min_classes limit the merges
    centres = np.array([[0.0], [0.01], [1.0], [1.02], [3.0]])
    counts = np.array([3, 1, 1, 1, 5])
    got = merge_clusters(centres, counts, max_pairs=2, merge_dist=0.05, min_classes=2)
    np.testing.assert_allclose(got, [[3.0], [0.0025], [1.01]])
    one = merge_clusters(centres, counts, max_pairs=1, merge_dist=0.05, min_classes=2)
    np.testing.assert_allclose(one, [[1.0], [1.02], [3.0], [0.0025]])
    floor = merge_clusters(centres, counts, max_pairs=2, merge_dist=0.05, min_classes=4)
    np.testing.assert_allclose(floor, [[1.0], [1.02], [3.0], [0.0025]])


def test_isodata_finds_the_clusters_within_its_class_bounds():
    rng = np.random.default_rng(0)
    truth = np.array([[0.1, 0.2], [0.5, 0.1], [0.3, 0.6], [0.7, 0.7]])
    x = np.concatenate([c + rng.normal(0, 0.01, (300, 2)) for c in truth])
    got = isodata(x, min_classes=4, max_classes=6, min_pixels=20)  # six start centres merge to four
    np.testing.assert_allclose(got, truth[np.lexsort(truth.T[::-1])], atol=0.005)
    wide = np.concatenate([x, [0.9, 0.2] + rng.normal(0, 0.01, (300, 2)) * [12, 1]])  # sigma 0.12 in band 0
    five = np.concatenate([truth, [[0.9, 0.2]]])
    np.testing.assert_allclose(isodata(wide, min_classes=2, max_classes=5, min_pixels=20),
                               five[np.lexsort(five.T[::-1])], atol=0.01)
    # room for a sixth class: the wide cluster splits into its halves, means 0.9 -/+ 0.12 sqrt(2 / pi)
    six = isodata(wide, min_classes=2, max_classes=6, min_pixels=20)
    np.testing.assert_allclose(six[-2:], [[0.804, 0.2], [0.996, 0.2]], atol=0.02)
    with pytest.raises(MethodError, match="min_classes"):
        isodata(x, min_classes=5, max_classes=4)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_nearest_centre_jax_equals_numpy_with_nan_and_ties(seed):
    import jax

    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 1, (3, 9, 11))
    pixels[1, 2, 3] = np.nan
    centres = rng.uniform(0, 1, (5, 3))
    centres[4] = centres[1]  # a tie: the lower index
    pixels[:, 0, 0] = centres[2]
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(nearest_centre_jax)(pixels, centres))
    want = nearest_centre(pixels, centres)
    np.testing.assert_array_equal(got, want)
    assert got[2, 3] == -1 and got[0, 0] == 2 and not (got == 4).any()

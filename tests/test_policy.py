"""Policy: validation, the thread-local context manager, nesting, restoring on exceptions."""
import threading

import pytest

import muse_compile as mc
from muse_compile import Policy, current_policy, policy


def test_defaults_match_the_design():
    p = Policy()
    assert (p.min_context, p.clusters, p.query_clusters, p.causal, p.dipole, p.kmeans_iters, p.block_size,
            p.enabled) == (4096, 128, None, True, True, 2, 256, True)


@pytest.mark.parametrize("field,value", [
    ("min_context", -1), ("clusters", 0), ("query_clusters", 0), ("kmeans_iters", -1), ("block_size", 0),
    ("clusters", 2.5), ("clusters", True), ("causal", 1), ("dipole", "yes"), ("enabled", None),
])
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Policy(**{field: value})


def test_frozen():
    with pytest.raises(Exception):
        Policy().clusters = 3


def test_nesting_and_restore():
    assert current_policy() == Policy()
    with policy(clusters=64) as outer:
        assert outer.clusters == 64 and current_policy() is outer
        with policy(min_context=10):
            assert current_policy().clusters == 64 and current_policy().min_context == 10
        assert current_policy() is outer
        with policy(Policy(dipole=False)):
            assert current_policy().dipole is False and current_policy().clusters == 128
    assert current_policy() == Policy()


def test_restores_on_exception():
    with pytest.raises(RuntimeError):
        with policy(clusters=7):
            raise RuntimeError("boom")
    assert current_policy().clusters == 128


def test_decorator():
    @policy(block_size=64)
    def f():
        return current_policy().block_size

    assert f() == 64 and f() == 64
    assert current_policy().block_size == 256


def test_bad_policy_fails_where_written():
    with pytest.raises(ValueError, match="clusters"):
        policy(clusters=0)
    with pytest.raises(ValueError, match="unknown"):
        policy(cluster=3)


def test_thread_local():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(n):
        with policy(clusters=n):
            barrier.wait()
            seen[n] = current_policy().clusters
            barrier.wait()

    ts = [threading.Thread(target=worker, args=(n,)) for n in (3, 5)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert seen == {3: 3, 5: 5}
    assert current_policy().clusters == 128


def test_op_kwargs_feed_the_op():
    import torch
    q = torch.randn(1, 1, 16, 4)
    p = Policy(clusters=4, dipole=False, kmeans_iters=1)
    out = mc.multipole_attention(q, q, q, **p.op_kwargs())
    assert out.shape == q.shape

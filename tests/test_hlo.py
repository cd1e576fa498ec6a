"""benchmarks/_hlo.py, which reads compiled HLO for the benchmarks and the tests, on HLO
text written here: what it must find, and what it must refuse to count."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import _hlo

MLP_PARAMS = (64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)  # 85,002

_HLO = """\
HloModule jit_step, entry_computation_layout={()}

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%sync (p: (f32[3])) -> (f32[3]) {
  %all-reduce.1 = (f32[256]{0}, f32[64,256]{1,0}, f32[256]{0}, f32[256,256]{1,0}, f32[10]{0}, \
/*index=5*/f32[256,10]{1,0}) all-reduce(%a, %b, %c, %d, %e, %f), to_apply=%add
  ROOT %t = (f32[3]) tuple(%x)
}

%no_sync (p: (f32[3])) -> (f32[3]) {
  ROOT %t = (f32[3]) tuple(%x)
}

ENTRY %main (a: f32[3]) -> f32[3] {
  %ar = bf16[4,2]{1,0} all-reduce-start(bf16[4,2]{1,0} %a), to_apply=%add
  %done = bf16[4,2]{1,0} all-reduce-done(bf16[4,2]{1,0} %ar)
  %conditional = (f32[3]) conditional(s32[] %i, %p, %p), branch_computations={%no_sync, %sync}
  ROOT %r = f32[3] get-tuple-element(%conditional), index=0
}
"""


def test_collective_bytes_splits_every_step_from_the_sync_branch():
    counted = _hlo.collective_bytes(_HLO)
    assert counted["every_step"] == 4 * 2 * 2  # the bf16 all-reduce-start, not its -done
    assert counted["branches"] == [[0, 4 * MLP_PARAMS]]  # a 6-tuple with an "index=5" comment
    assert counted["ops"] == {"all-reduce": 2}


def test_collective_bytes_refuses_a_collective_inside_a_loop():
    looped = _HLO.replace(
        "conditional(s32[] %i, %p, %p), branch_computations={%no_sync, %sync}",
        "while(%p), condition=%no_sync, body=%sync",
    )
    with pytest.raises(ValueError, match="loop body"):
        _hlo.collective_bytes(looped)


def test_computations_branches_and_what_a_branch_reaches():
    module = _hlo.computations(_HLO)
    assert {"add", "sync", "no_sync", "main"} <= set(module)
    assert _hlo.entry(_HLO) == "main"
    assert _hlo.branches(_HLO) == [["no_sync", "sync"]]
    sync = _hlo.reachable(module, "sync")
    assert "%sum = f32[] add" in sync  # the all-reduce's to_apply, reached through the call
    assert _hlo.all_reduce_bytes(sync) == [4 * MLP_PARAMS]
    assert _hlo.all_reduce_bytes(_hlo.reachable(module, "no_sync")) == []
    # From the entry: its own bf16 all-reduce and, through the conditional, the sync's.
    assert sorted(_hlo.all_reduce_bytes(_hlo.reachable(module, "main"))) == [16, 4 * MLP_PARAMS]
    assert _hlo.count_collectives(_HLO) == {"all-reduce": 2}
    assert _hlo.count_collectives(module["no_sync"]) == {}


def test_large_copies_finds_the_copy_of_a_params_sized_buffer():
    # The detector must see a copy when XLA emits one: a value that is both donated and
    # updated, and returned unchanged, has to be copied.
    def step(x):
        return x + 1.0, x

    x = jnp.zeros(65_536)
    hlo = jax.jit(step, donate_argnums=0).lower(x).compile().as_text()
    (copy,) = _hlo.large_copies(hlo, 65_536)
    assert "f32[65536]" in copy
    assert _hlo.large_copies(hlo, 65_537) == []

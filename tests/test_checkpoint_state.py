"""state.json as a typed, versioned value (`jaxprune.prune.durable`), without a run."""

import json

import pytest

from jaxprune.errors import CheckpointError
from jaxprune.prune.durable import VERSION, DurableState, RunRecord


def _state() -> DurableState:
  run = RunRecord(carry=-12.5, modules=({"layer": 0, "module": "attn", "kept": [0, 2]},), passes={"solve": 3},
                  phase_seconds={"solves": 0.25}, plans={"0": [2, 40]}, tau=0.125, plan_seconds=1.5,
                  plan_phase_seconds={"scoring": 0.5}, dense_outputs=True, dense_digests={"0_attn.npy": "ab"})
  return DurableState({"model": "m", "config": "c"}, 1, (0,), {"0": {"num_heads": 2}}, "streams_0001.npz",
                      {"block_0000.npz": "cd"}, run)


def test_state_survives_json_exactly():
  s = _state()
  text = json.dumps(s.to_json())
  back = DurableState.from_json(json.loads(text), "state.json", "fix")
  assert back.to_json() == s.to_json() and back.version == VERSION
  assert back.run.plans == {"0": [2, 40]} and back.run.tau == 0.125 and back.next_block == 1


def test_the_optional_fields_of_this_layout_default_to_empty():
  d = _state().to_json()
  for k in ("plan_phase_seconds", "dense_outputs", "dense_digests"):
    del d[k]
  back = DurableState.from_json(d, "state.json", "fix")
  assert (back.run.plan_phase_seconds, back.run.dense_outputs, back.run.dense_digests) == ({}, False, {})


@pytest.mark.parametrize("change,needles", [
    (lambda d: d.pop("version"), ("version 1", f"reads version {VERSION}")),  # the layout before hashes
    (lambda d: d.update(version=VERSION + 1), (f"version {VERSION + 1}",)),
    (lambda d: d.pop("carry"), ("lacks carry",)),
    (lambda d: d.update(modules="none"), ("lacks modules", "another type")),
    (lambda d: d.update(next_block="1"), ("lacks next_block",)),
])
def test_another_layout_or_a_missing_field_is_one_line(change, needles):
  d = _state().to_json()
  change(d)
  with pytest.raises(CheckpointError) as e:
    DurableState.from_json(d, "ckpt/state.json", "pass --force to start over")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("ckpt/state.json") and msg.endswith("pass --force to start over")
  assert all(n in msg for n in needles), msg

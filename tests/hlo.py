"""Reading XLA's compiled HLO text: which collectives a jitted kernel runs, and where.

Used to check how a kernel communicates (e.g. that statistics are reduced over the
`data` axis once per module, not once per chunk inside the scan's loop). Understands
the replica-group notations XLA prints: explicit lists, `[a,b]<=[n]` iotas (with an
optional transpose) and `mesh[...] {axes}`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

REDUCTIONS = ("all-reduce", "reduce-scatter")


class Collective(NamedTuple):
  op: str
  groups: list[list[int]]  # partition ids taking part together
  in_loop: bool  # inside a while loop's body (a scan's step), or called from one
  line: str


def _computations(text: str) -> dict[str, str]:
  out, name, buf = {}, None, []
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if m:
      name, buf = m.group(1), []
    elif line.startswith("}") and name:
      out[name], name = "\n".join(buf), None
    elif name:
      buf.append(line)
  return out


def _reached(comps: dict[str, str], roots) -> set[str]:
  seen, todo = set(), list(roots)
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    todo += re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", comps[c])
    for group in re.findall(r"branch_computations=\{([^}]*)\}", comps[c]):
      todo += [g.strip().lstrip("%") for g in group.split(",")]
  return seen


def _groups(line: str, n: int) -> list[list[int]]:
  if re.search(r"replica_groups=\{\}", line):
    return [list(range(n))]
  m = re.search(r"replica_groups=\{(\{[^=]*?\})\}", line)
  if m:
    return [[int(v) for v in g.split(",") if v.strip()] for g in re.findall(r"\{([^{}]*)\}", m.group(1))]
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:
    shape, src = ([int(v) for v in g.split(",")] for g in m.groups()[:2])
    a = np.arange(int(np.prod(src))).reshape(src)
    if m.group(3):
      a = a.transpose([int(v) for v in m.group(3).split(",")])
    return a.reshape(shape).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}",
                line)
  if m:
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    ids = np.arange(int(np.prod(sizes)))
    if m.group(2):  # the mesh's devices in a permuted order: an iota, reshaped and transposed
      ids = ids.reshape([int(v) for v in m.group(2).split(",")])
      if m.group(3):
        ids = ids.transpose([int(v) for v in m.group(3).split(",")])
    red = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
    keep = [i for i in range(len(sizes)) if i not in red]
    a = ids.reshape(sizes).transpose(keep + red)
    return a.reshape(-1, int(np.prod([sizes[i] for i in red]))).tolist()
  raise ValueError(f"unknown replica_groups notation in: {line[:300]}")


def collectives(text: str, num_partitions: int) -> list[Collective]:
  """Every collective of the compiled module `text`, with its groups and whether it runs in a loop."""
  comps = _computations(text)
  loops = _reached(comps, re.findall(r"body=%?([\w.\-]+)", text))
  out = []
  for name, body in comps.items():
    for line in body.splitlines():
      m = re.search(r"[)}\]] (all-reduce|reduce-scatter|all-gather|all-to-all|collective-permute)(?:-start)?\(", line)
      if m and m.group(1) != "collective-permute":
        out.append(Collective(m.group(1), _groups(line, num_partitions), name in loops, line))
  return out


def spans_axis(groups: list[list[int]], coordinate) -> bool:
  """Whether some group holds partitions at different `coordinate(partition id)`s."""
  return any(len({coordinate(i) for i in g}) > 1 for g in groups)


def loop_ops(text: str, ops: tuple[str, ...]) -> list[tuple[str, tuple[int, ...]]]:
  """(op, result shape) of every instruction `op` in a while loop's body or called from one
  (fusions included), of the compiled module `text`."""
  comps = _computations(text)
  loops = _reached(comps, re.findall(r"body=%?([\w.\-]+)", text))
  out = []
  for name in loops:
    for line in comps[name].splitlines():
      m = re.search(r"= \w+\[([\d,]*)\]\{[^}]*\} (" + "|".join(map(re.escape, ops)) + r")\(", line)
      if m:
        out.append((m.group(2), tuple(int(v) for v in m.group(1).split(",") if v)))
  return out

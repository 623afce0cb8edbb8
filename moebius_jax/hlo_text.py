"""Facts read from a compiled program's HLO text: its collectives and its memory traffic by
memory space.

XLA:TPU's cost analysis ("bytes accessed") adds up every instruction's operands and results
wherever they live. After memory-space assignment many of them live in on-chip memory (VMEM:
128 MiB on v5e, with many times HBM's bandwidth), marked `S(1)` in their layouts; arrays
without a memory space are in device memory (HBM). `memory_traffic` makes the same count
split by memory space, so the traffic that HBM's bandwidth limits can be told from the rest.

Sizes are those of the compiled layouts: TPU layouts tile their two minor dimensions (e.g.
`T(8,128)`), so a 40-wide minor dimension occupies 128 lanes; the count applies that padding,
as XLA's own figure does. An instruction's operands and result count once each; an async pair
(`copy-start` / `copy-done`, ...) counts its operands at the start and its result at the done,
and a `slice-start` reads only its slice of the source.
Loop bodies count once, like XLA's cost analysis (`aot` corrects both for scan trip counts).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DEVICE_MEMORY = 0  # the memory space of arrays whose layout names none: HBM

# An array type with an optional layout: `bf16[2,64,64,320]{3,2,1,0:T(8,128)(2,1)S(1)}`.
_ARRAY = re.compile(r"\b(?P<dtype>pred|token|[sufc]\d+|bf16|f8\w*)\[(?P<dims>[\d,]*)\](?:\{(?P<layout>[^}]*)\})?")
_TILE = re.compile(r"T\((?P<dims>[\d,]+)\)")
_SPACE = re.compile(r"S\((?P<space>\d+)\)")
# `[ROOT] %name = <type> <opcode>(<operands>)<attributes>`; the type may be a tuple.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
# Computations run as part of the program's own schedule (not fused into one kernel).
_CALLED = re.compile(r"\b(?:body|condition|to_apply|true_computation|false_computation)=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{(?P<names>[^}]*)\}")
# Bookkeeping that moves no data, and control flow whose bodies are counted instead.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id",
               "replica-id", "while", "conditional", "call", "opt-barrier"}


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
    count: int  # ops in the program text (an op inside a loop body counts once)
    bytes: int  # sum of their result sizes


@dataclasses.dataclass(frozen=True)
class MemoryTraffic:
    """Bytes of instruction operands and results, by memory space (0: device memory, HBM)."""

    by_space: dict[int, int]

    @property
    def device_bytes(self) -> int:
        return self.by_space.get(DEVICE_MEMORY, 0)

    @property
    def on_chip_bytes(self) -> int:
        return sum(b for space, b in self.by_space.items() if space != DEVICE_MEMORY)


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    type: str  # the result type text
    opcode: str
    operands: tuple[str, ...]  # operand names (or inline types, in older text formats)
    attributes: str


def _itemsize(dtype: str) -> float:
    if dtype in ("pred", "token"):
        return 1.0 if dtype == "pred" else 0.0
    if dtype == "bf16" or dtype.startswith("f8"):
        return 2.0 if dtype == "bf16" else 1.0
    return int(dtype[1:]) / 8  # s4 / u4 take half a byte


def _arrays(type_text: str) -> Iterator[tuple[int, int]]:
    """(bytes, memory space) of each array in a type, padded to its layout's tile."""
    for m in _ARRAY.finditer(type_text):
        dims = [int(d) for d in m.group("dims").split(",") if d]
        layout = m.group("layout") or ""
        order_text, _, tiling = layout.partition(":")
        tile = _TILE.search(tiling)
        if tile and dims:
            order = [int(i) for i in order_text.split(",") if i]  # minor-to-major
            # The tile's last dimension covers the most minor array dimension, and so on.
            for dim, size in zip(order, [int(t) for t in reversed(tile.group("dims").split(","))]):
                dims[dim] = -(-dims[dim] // size) * size
        space = _SPACE.search(tiling)
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        yield int(count * _itemsize(m.group("dtype"))), int(space.group("space")) if space else DEVICE_MEMORY


def array_bytes(type_text: str) -> int:
    """Bytes of the arrays in an HLO type (tuples summed), padded to their layouts' tiles."""
    return sum(size for size, _ in _arrays(type_text))


def _closing(text: str, start: int) -> int:
    """Index just past the bracket that closes the one opening at `start`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def _split_operands(text: str) -> tuple[str, ...]:
    parts, depth, current = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(c)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return tuple(parts)


def _parse_instruction(line: str) -> _Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    rest = m.group("rest")
    if rest.startswith("("):
        end = _closing(rest, 0)
        type_text, rest = rest[:end], rest[end:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    op = re.match(r"(?P<opcode>[a-z][\w\-]*)\(", rest)
    if not op:
        return None
    end = _closing(rest, op.end() - 1)
    operands = _split_operands(rest[op.end():end - 1])
    return _Instruction(m.group("name"), type_text, op.group("opcode"), operands, rest[end:])


def _computations(hlo_text: str) -> tuple[str | None, dict[str, list[_Instruction]]]:
    """(entry name, {computation: instructions}) of an HLO module's text."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line) if line and not line[0].isspace() else None
        if header and not line.startswith("HloModule"):
            current = computations.setdefault(header.group("name"), [])
            entry = header.group("name") if header.group("entry") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (instruction := _parse_instruction(line)):
            current.append(instruction)
    return entry, computations


def collectives(hlo_text: str) -> tuple[Collective, ...]:
    """Collective ops in compiled HLO text: kind, count and result bytes (async pairs counted
    at their start)."""
    counts: dict[str, list[int]] = {}
    for ins in filter(None, map(_parse_instruction, hlo_text.splitlines())):
        kind = ins.opcode.removesuffix("-start")
        if kind not in COLLECTIVE_KINDS or ins.opcode.endswith("-done"):
            continue
        entry = counts.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += _result_bytes_of_collective(ins)
    return tuple(Collective(k, n, b) for k, (n, b) in sorted(counts.items()))


def _result_bytes_of_collective(ins: _Instruction) -> int:
    """An async collective's start returns (operands, results[, context]): count the results."""
    if ins.opcode.endswith("-start") and ins.type.startswith("(("):
        inner = _split_operands(ins.type[1:-1])
        return sum(array_bytes(t) for t in inner[1:2])
    return array_bytes(ins.type)


def _scheduled(entry: str, computations: dict[str, list[_Instruction]]) -> list[str]:
    """The entry computation and the loop bodies, branches and calls reachable from it."""
    seen, todo = [], [entry]
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.append(name)
        for ins in computations[name]:
            todo += [m.group("name") for m in _CALLED.finditer(ins.attributes)]
            for m in _BRANCHES.finditer(ins.attributes):
                todo += [n.strip().lstrip("%") for n in m.group("names").split(",")]
    return seen


def memory_traffic(hlo_text: str) -> MemoryTraffic:
    """Operand and result bytes of every scheduled instruction of a compiled program, by the
    memory space its layouts name (see the module docstring)."""
    entry, computations = _computations(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    types = {ins.name: ins.type for instructions in computations.values() for ins in instructions}
    by_space: dict[int, int] = {}

    def add(type_text: str) -> None:
        for size, space in _arrays(type_text):
            by_space[space] = by_space.get(space, 0) + size

    for name in _scheduled(entry, computations):
        for ins in computations[name]:
            if ins.opcode in _NO_TRAFFIC:
                continue
            operands = [types.get(operand.split()[-1].lstrip("%"), operand) for operand in ins.operands]
            if ins.opcode == "slice-start":
                # ((source), slice, context): only the slice is read, from the source's memory.
                (_, source_space), = _arrays(operands[0])
                sliced = array_bytes(_split_operands(ins.type[1:-1])[1])
                by_space[source_space] = by_space.get(source_space, 0) + sliced
            elif not ins.opcode.endswith("-done"):
                for operand in operands:
                    add(operand)
            if not ins.opcode.endswith("-start"):
                add(ins.type)
    return MemoryTraffic(dict(sorted(by_space.items())))

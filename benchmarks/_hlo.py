"""Reading XLA's compiled HLO text (``jit(f).lower(...).compile().as_text()``).

One home for what the benchmarks and the tests count in a compiled program: collectives and
the bytes they move, params-sized copies, the computations of a module and what one of them
reaches. The benchmarks import it as ``_hlo`` (benchmarks/ is on their sys.path), the tests
as ``benchmarks._hlo``.
"""

from __future__ import annotations

import collections
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all", "collective-broadcast")  # fmt: skip
# An op anywhere in a line; the async form (all-reduce-start / -done) counts once, at its start.
_COLLECTIVE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
# One instruction per line: "%name = <result type> all-reduce(...)". A tuple type may hold
# "/*index=5*/" comments, so the type is everything between "= " and the op's name.
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", re.M
)
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
          "pred": 1, "s64": 8, "u64": 8, "s16": 2, "u16": 2, "c64": 8, "c128": 16}  # fmt: skip
_COPY = re.compile(r"= \w+\[([\d,]*)\]\S* copy\(")


def count_collectives(hlo: str) -> collections.Counter:
    """Collective op name -> how many of them the text holds."""
    return collections.Counter(_COLLECTIVE.findall(hlo))


def shape_bytes(result: str) -> int:
    """Bytes of an HLO result type: ``f32[8,256]{1,0}``, or the sum over a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", result):
        total += math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype]
    return total


def collective_ops(hlo: str) -> list[tuple[str, int]]:
    """(op name, bytes of its result) for each collective instruction in the text."""
    return [(op, shape_bytes(result)) for result, op in _OP.findall(hlo)]


def all_reduce_bytes(hlo: str) -> list[int]:
    """Bytes of each all-reduce's result (a tuple when XLA combines several) in the text."""
    return [size for op, size in collective_ops(hlo) if op == "all-reduce"]


def large_copies(hlo: str, min_elements: int) -> list[str]:
    """The copy instructions that move at least ``min_elements`` values."""
    found = []
    for line in hlo.splitlines():
        match = _COPY.search(line)
        if match and math.prod(int(d) for d in match.group(1).split(",") if d) >= min_elements:
            found.append(line.strip())
    return found


def computations(hlo: str) -> dict[str, str]:
    """Name (without "%") -> text of each computation of an HLO module, ENTRY's included."""
    found = {}
    for block in re.split(r"\n(?=\S)", hlo):
        match = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s", block)
        if match:
            found[match.group(1)] = block
    return found


def entry(hlo: str) -> str:
    """The name of the module's ENTRY computation."""
    match = re.search(r"^ENTRY\s+%?([\w.\-]+)\s", hlo, re.M)
    if match is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return match.group(1)


def branches(text: str) -> list[list[str]]:
    """For each conditional in the text, the names of its branch computations, in order."""
    found = [
        [name.strip().lstrip("%") for name in group.split(",")]
        for group in re.findall(r"branch_computations=\{([^}]*)\}", text)
    ]
    found += [
        [t, f]
        for t, f in re.findall(
            r"true_computation=%?([\w.\-]+), false_computation=%?([\w.\-]+)", text
        )
    ]
    return found


def _calls(text: str) -> list[str]:
    """The computations a computation's text calls, other than a conditional's branches."""
    return re.findall(r"(?:calls|to_apply|condition)=%?([\w.\-]+)", text)


def _loop_bodies(text: str) -> list[str]:
    return re.findall(r"\bbody=%?([\w.\-]+)", text)


def reachable(module: dict[str, str], root: str) -> str:
    """The text of computation ``root`` of ``module`` (see computations) and of every
    computation it reaches: calls, loop bodies and the branches of its conditionals."""
    seen, stack, texts = set(), [root], []
    while stack:
        name = stack.pop()
        if name in seen or name not in module:
            continue
        seen.add(name)
        text = module[name]
        texts.append(text)
        stack += _calls(text) + _loop_bodies(text)
        stack += [branch for group in branches(text) for branch in group]
    return "\n".join(texts)


def collective_bytes(hlo: str) -> dict:
    """Collective bytes of one execution of a compiled program, from its HLO text.

    Returns ``every_step`` (bytes of the collectives every execution runs), ``branches``
    (for each conditional reached unconditionally, the bytes of each branch, nested calls
    included), and ``ops`` (collective op -> count, anywhere). Raises if a collective sits
    in a loop body, whose trip count would multiply it.
    """
    module = computations(hlo)

    def own(name):
        return sum(size for _, size in collective_ops(module[name]))

    def total(name, path=()):  # everything it runs, conditionals' branches included
        if name in path or name not in module:
            return 0
        text = module[name]
        nested = [b for group in branches(text) for b in group] + _calls(text) + _loop_bodies(text)
        return own(name) + sum(total(c, (*path, name)) for c in nested)

    every_step, conditionals = 0, []
    stack, seen = [entry(hlo)], set()
    while stack:
        name = stack.pop()
        if name in seen or name not in module:
            continue
        seen.add(name)
        every_step += own(name)
        for body in _loop_bodies(module[name]):
            if total(body):
                raise ValueError(f"a collective inside the loop body {body}: count it by hand")
        stack += _calls(module[name])
        conditionals += [[total(branch) for branch in group] for group in branches(module[name])]
    ops = collections.Counter(op for op, _ in collective_ops(hlo))
    return {"every_step": every_step, "branches": conditionals, "ops": dict(ops)}


# One instruction with its result type: "%name = f32[8]{0} fusion(%a, %b), kind=..." (a tuple
# result type may hold "/*index=5*/" comments).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)", re.M)
# Instructions that touch memory themselves; the rest (tuple, get-tuple-element, bitcast,
# parameter, constant) only name buffers.
_MOVES = ("fusion", "copy", "custom-call", "reduce", "dot", "all-reduce", "all-reduce-start",
          "convolution", "scatter", "sort", "dynamic-update-slice", "slice",
          "concatenate")  # fmt: skip


def _elements(result: str) -> int:
    return sum(
        math.prod(int(d) for d in dims.split(",") if d)
        for _, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", result)
    )


def _loop_fusion_reads(body: str) -> dict[int, int]:
    """Elements a loop fusion reads of each parameter: following each parameter's users, a
    slice reads its own elements, a path that reaches the root without one reads the
    root's; capped at the parameter's size (a worker's slice of a stacked array counts as
    the slice, the sum of every worker's slice as the whole array)."""
    found = _INSTRUCTION.findall(body)
    users: dict[str, list[tuple[str, str, str]]] = {}
    for name, result, op, operands in found:
        for operand in re.findall(r"%([\w.\-]+)", operands):
            users.setdefault(operand, []).append((name, result, op))
    root = re.search(r"ROOT\s+%([\w.\-]+) = (.*?) [a-z]", body)
    root_elements = _elements(root.group(2)) if root else 0
    reads = {}
    for name, result, op, operands in found:
        if op != "parameter":
            continue
        seen, stack, total = set(), [name], 0
        while stack:
            current = stack.pop()
            for user, user_result, user_op in users.get(current, []):
                if user in seen:
                    continue
                seen.add(user)
                if user_op in ("slice", "dynamic-slice"):
                    total += _elements(user_result)
                else:
                    stack.append(user)
        if root and (name == root.group(1) or root.group(1) in seen):
            total += root_elements
        reads[int(operands)] = min(total, _elements(result))
    return reads


def _operand_reads(line: str, result: str, operands: list[str], shapes: dict, module: dict):
    """Bytes an instruction reads of each operand (loop fusions: ``_loop_fusion_reads``)."""
    sizes = [shape_bytes(shapes.get(o.strip().lstrip("%"), "")) for o in operands]
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if "kind=kLoop" not in line or not called or called.group(1) not in module:
        return sizes
    elements = _loop_fusion_reads(module[called.group(1)])
    for index, operand in enumerate(operands):
        shape = shapes.get(operand.strip().lstrip("%"), "")
        if index in elements and _elements(shape):
            sizes[index] = elements[index] * shape_bytes(shape) // _elements(shape)
    return sizes


def traffic(text: str, min_bytes: int, module: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes that the instructions of a computation's text read and write, counting only the
    operands and results of at least ``min_bytes`` (params-sized arrays, not scalars).

    ``read`` sums each instruction's large operands (an operand read by two instructions
    counts twice: XLA:CPU streams it from memory each time; given ``module`` (see
    ``computations``), a loop fusion that slices an operand counts the slices),
    ``written`` its large results, ``instructions`` how many such instructions there are.
    A fusion is one pass over what it reads and writes.
    """
    shapes = {name: result for name, result, _, _ in _INSTRUCTION.findall(text)}
    read = written = count = 0
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match or match.group(3) not in _MOVES:
            continue
        _, result, op, operands = match.groups()
        out = shape_bytes(result)
        ins = _operand_reads(line, result, operands.split(","), shapes, module or {})
        ins = [b for b in ins if b >= min_bytes]
        if out < min_bytes and not ins:
            continue
        count += 1
        written += out if out >= min_bytes else 0
        read += sum(ins)
    return {"read": read, "written": written, "instructions": count}


def sync_branch_traffic(hlo: str, min_bytes: int) -> dict[str, int]:
    """``traffic`` of the busiest branch of the module's conditionals (the sync branch of a
    lookahead step) with the branches of the conditionals nested in it; fusion bodies are
    not entered (each fusion is one pass)."""
    module = computations(hlo)

    def texts(name: str) -> list[str]:
        text = module.get(name, "")
        return [text] + [t for group in branches(text) for b in group for t in texts(b)]

    found = [
        traffic("\n".join(texts(name)), min_bytes, module)
        for group in branches(hlo)
        for name in group
        if name in module
    ]
    if not found:
        raise ValueError("no conditional in the HLO text")
    return max(found, key=lambda t: t["read"] + t["written"])

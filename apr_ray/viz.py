"""The thread-tree viewer: one rollout (a `TreeRecord`) as a self-contained HTML page.

Owns the page (layout, markup, styles, script), reading a TREE.json file (one tree object or a list of
them, in the format of `types.tree_to_dict`) with errors that name the file and the bad field, and
turning a solver demonstration into a `TreeRecord` so demonstrations and rollouts look alike.
Must not import torch, Ray or vLLM; the tokenizer (transformers) is imported only by `view_main`.

The page works offline and from a file: no network at all (a Content-Security-Policy forbids it), all
CSS, JS and SVG inline. Model output is untrusted: every string goes into the markup through
`html.escape`, and into the script as JSON with `<`, `>` and `&` escaped; the script writes text only
with `textContent`, never as HTML. The layout is computed here, in Python, so tests can check it: a
thread's segments stand in a column, the children of a spawn fan out in a row under the segment that
spawned them, and join edges lead from each child's last segment to the parent's next segment.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from apr_ray.countdown import text as T
from apr_ray.types import EndReason, ThreadRecord, TreeMetrics, TreeRecord, critical_path, tree_from_dict

if TYPE_CHECKING:
    from apr_ray.countdown.demos import Demo

Decode = Callable[[list[int]], str]

# Node box and gaps of the tree layout, in SVG pixels at zoom 1.
NODE_W, NODE_H = 156, 50
H_GAP, V_GAP = 14, 34
MARGIN = 20
# Nesting beyond this is not laid out under its parent (a corrupted file could nest without end);
# such threads are shown as separate, unreachable subtrees with a warning.
MAX_LAYOUT_DEPTH = 200

# Colour groups of end reasons: what a researcher scans for first.
END_GROUPS: dict[EndReason, str] = {
    EndReason.EOS: "eos",
    EndReason.SPAWN: "spawn",
    EndReason.MAX_TOKENS: "limit",
    EndReason.CONTEXT: "limit",
    EndReason.TREE_TOKENS: "limit",
    EndReason.TIMEOUT: "limit",
    EndReason.DEPTH: "limit",
    EndReason.MALFORMED: "malformed",
    EndReason.ERROR: "error",
}
GROUP_LABELS = {
    "eos": "finished (eos)",
    "spawn": "spawned children",
    "limit": "hit a limit (max_tokens, context, tree_tokens, timeout, depth)",
    "malformed": "malformed output",
    "error": "engine error",
}


class TreeFileError(ValueError):
    """A TREE.json file that cannot be viewed; the message names the file and what is wrong in it."""


# --- reading TREE.json ---------------------------------------------------------------------------


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(hint: object) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(hint, str(hint))


def _matches(value: object, hint: object) -> bool:
    """Scalar check; bool is not accepted where a number is (JSON true is not 1)."""
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return any(value == m.value for m in hint)
    raise TypeError(f"no check for field type {hint!r}")


def _check(value: object, hint: object, where: str) -> None:
    """Raise TreeFileError at the first place where `value` does not fit the field type `hint`."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        _check_record(value, hint, where)
    elif origin is list:
        if not isinstance(value, list):
            raise TreeFileError(f"{where}: expected {_type_name(hint)}, got {type(value).__name__} {_short(value)}")
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            for i, v in enumerate(value):
                _check_record(v, item, f"{where}[{i}]")
        elif not all(_matches(v, item) for v in value):  # one pass over long id lists, then locate
            i = next(i for i, v in enumerate(value) if not _matches(v, item))
            raise TreeFileError(f"{where}[{i}]: expected {_type_name(item)}, got {_short(value[i])}")
    elif origin in (types.UnionType, typing.Union):
        if not any(_matches(value, h) for h in typing.get_args(hint)):
            raise TreeFileError(f"{where}: expected {_type_name(hint)}, got {_short(value)}")
    elif not _matches(value, hint):
        raise TreeFileError(f"{where}: expected {_type_name(hint)}, got {_short(value)}")


def _check_record(obj: object, cls: type, where: str) -> None:
    if not isinstance(obj, dict):
        raise TreeFileError(f"{where}: expected an object ({cls.__name__}), got {type(obj).__name__} {_short(obj)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise TreeFileError(f"{where}: unknown key(s) {unknown} for {cls.__name__}")
    for name, f in fields.items():
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TreeFileError(f"{where}: missing key {name!r} ({cls.__name__})")
            continue
        _check(obj[name], hints[name], f"{where}.{name}" if where else name)


def parse_tree(obj: object, where: str = "tree") -> TreeRecord:
    """A TreeRecord from a `tree_to_dict` object, checking every field's type first so that a bad
    file fails with the path of the bad value (`tree.threads[3].end_reason: expected ...`)."""
    _check_record(obj, TreeRecord, where)
    return tree_from_dict(obj)  # type: ignore[arg-type]


def load_tree(path: Path, index: int = 0) -> tuple[TreeRecord, int]:
    """The tree at `index` of a TREE.json file and the number of trees in the file.

    The file holds one tree object (then `index` must be 0) or a list of tree objects.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TreeFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TreeFileError(f"{path}: cannot read: {err}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise TreeFileError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if isinstance(data, dict):
        trees: list = [data]
    elif isinstance(data, list):
        trees = data
    else:
        raise TreeFileError(f"{path}: expected a tree object or a list of tree objects, got {type(data).__name__}")
    if not trees:
        raise TreeFileError(f"{path}: the list of trees is empty")
    if not 0 <= index < len(trees):
        held = "one tree (index 0)" if len(trees) == 1 else f"{len(trees)} trees (index 0..{len(trees) - 1})"
        raise TreeFileError(f"{path}: holds {held}; index {index} is out of range")
    where = "tree" if isinstance(data, dict) else f"tree[{index}]"
    try:
        return parse_tree(trees[index], where), len(trees)
    except TreeFileError as err:
        raise TreeFileError(f"{path}: {err}") from None


# --- layout --------------------------------------------------------------------------------------


@dataclass
class _Block:
    """A thread's laid-out subtree: its segments (request indices) and the children of each segment."""

    thread_id: int
    segments: list[int]
    kids: list[list[_Block]] = field(default_factory=list)
    width: float = NODE_W


@dataclass
class Layout:
    """Where each request's node goes and which edges connect them."""

    pos: dict[int, tuple[float, float]]  # request index -> top-left corner of its node
    edges: list[tuple[str, int, int]]  # (kind: spawn | join | seq, from request index, to request index)
    order: list[int]  # request indices depth first: a segment, the threads it spawned, the next segment
    width: float
    height: float
    warnings: list[str]


def layout_tree(threads: Sequence[ThreadRecord]) -> Layout:
    """Place every request of the tree, whatever its consistency: problems become warnings.

    Requests are addressed by their position in `threads`. A thread not reachable from the root (its
    spawning segment is missing or names another thread) becomes an extra subtree to the right.
    """
    warnings: list[str] = []
    by_thread: dict[int, list[int]] = {}
    for i, rec in enumerate(threads):
        by_thread.setdefault(rec.thread_id, []).append(i)
    for tid, idxs in by_thread.items():
        idxs.sort(key=lambda i: (threads[i].segment, i))
        segs = [threads[i].segment for i in idxs]
        if segs != list(range(len(segs))):
            warnings.append(f"thread {tid} has segments {segs}, expected 0..{len(segs) - 1}")

    placed: set[int] = set()

    def plan(tid: int, depth: int) -> _Block:
        placed.add(tid)
        block = _Block(tid, by_thread[tid])
        for i in block.segments:
            group: list[_Block] = []
            for child in threads[i].spawned_thread_ids:
                if child not in by_thread:
                    warnings.append(f"request {i} (thread {tid}) spawned thread {child}, which has no records")
                elif child in placed:
                    warnings.append(f"request {i} (thread {tid}) spawned thread {child}, already placed elsewhere")
                elif depth + 1 > MAX_LAYOUT_DEPTH:
                    warnings.append(f"thread {child} nests deeper than {MAX_LAYOUT_DEPTH} levels; shown apart")
                else:
                    if threads[by_thread[child][0]].parent_thread_id != tid:
                        warnings.append(
                            f"thread {child} records parent {threads[by_thread[child][0]].parent_thread_id} "
                            f"but was spawned by thread {tid}"
                        )
                    group.append(plan(child, depth + 1))
            block.kids.append(group)
        row_widths = [sum(k.width for k in g) + H_GAP * (len(g) - 1) for g in block.kids if g]
        block.width = max([NODE_W, *row_widths])
        return block

    roots = [tid for tid, idxs in by_thread.items() if threads[idxs[0]].parent_thread_id == -1]
    if len(roots) != 1:
        warnings.append(f"expected one root thread (parent -1), found {len(roots)}: {roots[:10]}")
    blocks = [plan(tid, 0) for tid in roots]
    for tid in by_thread:  # threads no spawn led to, in order of first appearance
        if tid not in placed:
            first = threads[by_thread[tid][0]]
            warnings.append(f"thread {tid} (parent {first.parent_thread_id}) is not reachable from the root")
            blocks.append(plan(tid, 0))

    pos: dict[int, tuple[float, float]] = {}
    edges: list[tuple[str, int, int]] = []
    order: list[int] = []

    def place(block: _Block, x0: float, y0: float) -> float:
        """Put `block` with its left edge at x0 and its top at y0; return its bottom."""
        left = x0 + (block.width - NODE_W) / 2
        y = y0
        for k, i in enumerate(block.segments):
            pos[i] = (left, y)
            order.append(i)
            y += NODE_H
            group = block.kids[k]
            nxt = block.segments[k + 1] if k + 1 < len(block.segments) else None
            if group:
                y += V_GAP
                row = sum(g.width for g in group) + H_GAP * (len(group) - 1)
                x, bottom = x0 + (block.width - row) / 2, y
                for kid in group:
                    bottom = max(bottom, place(kid, x, y))
                    x += kid.width + H_GAP
                    edges.append(("spawn", i, kid.segments[0]))
                    if nxt is not None:
                        edges.append(("join", kid.segments[-1], nxt))
                y = bottom
            elif nxt is not None:
                edges.append(("seq", i, nxt))
            if nxt is not None:
                y += V_GAP
        return y

    x, height = float(MARGIN), 0.0
    for block in blocks:
        height = max(height, place(block, x, MARGIN))
        x += block.width + 3 * H_GAP
    width = max(x - 3 * H_GAP + MARGIN, NODE_W + 2 * MARGIN)
    return Layout(pos, edges, order, width, max(height, NODE_H + MARGIN) + MARGIN, warnings)


# --- page ----------------------------------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _script_json(data: object) -> str:
    """JSON safe inside a <script> element: no `</script>`, `<!--` or entity can form."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def _decode(decode: Decode, ids: list[int], i: int, what: str) -> str:
    try:
        return decode(list(ids))
    except Exception as err:  # a tokenizer raises many types; the page must say which request broke
        raise ValueError(f"request {i}: cannot decode its {what} ids: {type(err).__name__}: {err}") from err


def _edge_path(layout: Layout, a: int, b: int) -> str:
    (ax, ay), (bx, by) = layout.pos[a], layout.pos[b]
    x1, y1, x2, y2 = ax + NODE_W / 2, ay + NODE_H, bx + NODE_W / 2, by
    bend = max(12.0, min(40.0, (y2 - y1) / 2))
    return f"M{x1:.1f} {y1:.1f} C{x1:.1f} {y1 + bend:.1f} {x2:.1f} {y2 - bend:.1f} {x2:.1f} {y2:.1f}"


def _tree_svg(tree: TreeRecord, layout: Layout, cp: set[int]) -> str:
    parts = [
        f'<svg id="tree" class="tree" width="{layout.width:.0f}" height="{layout.height:.0f}" '
        f'viewBox="0 0 {layout.width:.0f} {layout.height:.0f}" role="img" aria-label="thread tree">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" '
        'markerWidth="9" markerHeight="9" orient="auto-start-reverse">'
        '<path d="M0 0L10 5L0 10z" class="arrowhead"/></marker></defs>',
        '<g class="edges">',
    ]
    for kind, a, b in layout.edges:
        cls = f"edge {kind}" + (" cp" if a in cp and b in cp else "")
        parts.append(
            f'<path class="{cls}" data-from="{a}" data-to="{b}" d="{_edge_path(layout, a, b)}" '
            'marker-end="url(#arrow)"/>'
        )
    parts.append('</g><g class="nodes">')
    for i, rec in enumerate(tree.threads):
        x, y = layout.pos[i]
        reason = rec.end_reason.value
        cls = f"node end-{END_GROUPS[rec.end_reason]}" + (" cp" if i in cp else "")
        tip = (
            f"request {i}: thread {rec.thread_id} (parent {rec.parent_thread_id}), depth {rec.depth}, "
            f"segment {rec.segment}\n{len(rec.prompt_ids)} prompt + {len(rec.output_ids)} output tokens, "
            f"ended: {reason}" + (f" ({rec.detail})" if rec.detail else "") + (" · critical path" if i in cp else "")
        )
        parts.append(
            f'<g class="{cls}" data-req="{i}" transform="translate({x:.1f},{y:.1f})" tabindex="0">'
            f"<title>{_esc(tip)}</title>"
            f'<rect class="box" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
            f'<rect class="band" width="7" height="{NODE_H}" rx="3"/>'
            f'<text x="14" y="19" class="l1">T{rec.thread_id} · seg {rec.segment} · d{rec.depth}</text>'
            f'<text x="14" y="38" class="l2">{len(rec.output_ids)} tok · {_esc(reason)}</text>'
            "</g>"
        )
    parts.append("</g></svg>")
    return "".join(parts)


def _timeline_svg(tree: TreeRecord, order: list[int], cp: set[int]) -> str:
    """One bar per request (rows in layout order) from start_s to end_s: where threads overlapped."""
    timed = {i for i, r in enumerate(tree.threads) if math.isfinite(r.start_s) and math.isfinite(r.end_s)}
    wall = max((max(tree.threads[i].end_s, tree.threads[i].start_s) for i in timed), default=0.0)
    if wall <= 0:
        return '<p class="note">No timings recorded (every start_s and end_s is 0).</p>'
    label_w, plot_w, row_h = 110, 900, 12
    height = 24 + row_h * len(order)
    scale = plot_w / wall
    parts = [f'<svg class="timeline" width="{label_w + plot_w + 60}" height="{height}">']
    for t in range(6):
        x = label_w + plot_w * t / 5
        parts.append(f'<line class="tick" x1="{x:.1f}" y1="14" x2="{x:.1f}" y2="{height}"/>')
        parts.append(f'<text class="ticklabel" x="{x:.1f}" y="10">{_esc(_fmt_s(wall * t / 5))}</text>')
    for row, i in enumerate(order):
        rec = tree.threads[i]
        y = 18 + row * row_h
        x = label_w + rec.start_s * scale
        w = max(1.5, (rec.end_s - rec.start_s) * scale)
        cls = f"bar end-{END_GROUPS[rec.end_reason]}" + (" cp" if i in cp else "")
        indent = 4 + 8 * min(rec.depth, 6)
        parts.append(f'<text class="rowlabel" x="{indent}" y="{y + 9}">T{rec.thread_id}·s{rec.segment}</text>')
        if i not in timed:
            continue
        parts.append(
            f'<rect class="{cls}" data-req="{i}" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 3}">'
            f"<title>{_esc(f'request {i}: {rec.start_s:.3f}-{rec.end_s:.3f} s')}</title></rect>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _finite(x: float | None) -> float | None:
    """JSON.parse rejects NaN and Infinity (a -inf logprob is possible): those become null."""
    return x if x is not None and math.isfinite(x) else None


def render_tree_html(tree: TreeRecord, decode: Decode) -> str:
    """The page for one tree. `decode` turns token ids into text (the tokenizer the tree was sampled with)."""
    threads = tree.threads
    layout = layout_tree(threads)
    warnings = list(layout.warnings)
    index_of: dict[int, int] = {}
    for i, rec in enumerate(threads):
        if rec.request_id in index_of:
            first = index_of[rec.request_id]
            warnings.append(f"request_id {rec.request_id} appears more than once (records {first}, {i})")
        index_of.setdefault(rec.request_id, i)
    try:
        cp_len, cp_ids = critical_path(list(threads))
    except ValueError as err:
        cp_len, cp_ids = 0, []
        warnings.append(f"critical path not computed: {err}")
    cp = {index_of[r] for r in cp_ids if r in index_of}
    m = tree.metrics
    generated = sum(len(r.output_ids) for r in threads)
    if generated != m.tokens_total:
        warnings.append(f"metrics.tokens_total is {m.tokens_total}, the records hold {generated} output tokens")
    if cp_ids and cp_len != m.tokens_critical_path:
        warnings.append(f"metrics.tokens_critical_path is {m.tokens_critical_path}, the records give {cp_len}")
    for i, rec in enumerate(threads):
        if len(rec.logprobs) != len(rec.output_ids):
            warnings.append(f"request {i}: {len(rec.logprobs)} logprobs for {len(rec.output_ids)} output tokens")

    order = layout.order
    records = []
    for i, rec in enumerate(threads):
        records.append({
            "req": i,
            "request_id": rec.request_id,
            "thread": rec.thread_id,
            "parent": rec.parent_thread_id,
            "depth": rec.depth,
            "segment": rec.segment,
            "end": rec.end_reason.value,
            "group": END_GROUPS[rec.end_reason],
            "detail": rec.detail,
            "start": _finite(rec.start_s),
            "stop": _finite(rec.end_s),
            "prompt_tokens": len(rec.prompt_ids),
            "output_tokens": len(rec.output_ids),
            "lp_mean": _finite(sum(rec.logprobs) / len(rec.logprobs)) if rec.logprobs else None,
            "lp_min": _finite(min(rec.logprobs)) if rec.logprobs else None,
            "spawned": rec.spawned_thread_ids,
            "cp": i in cp,
            "prompt": _decode(decode, rec.prompt_ids, i, "prompt"),
            "output": _decode(decode, rec.output_ids, i, "output"),
        })
    # segments of each thread in order, so the panel can link parent / next segment / children
    segs_of: dict[int, list[int]] = {}
    for i in sorted(range(len(threads)), key=lambda i: (threads[i].segment, i)):
        segs_of.setdefault(threads[i].thread_id, []).append(i)
    data = {"records": records, "segments": {str(t): s for t, s in segs_of.items()}}

    eta = 1 - cp_len / generated if generated and cp_ids else None
    verdict = (
        '<span class="badge ok">correct</span>' if tree.correct else '<span class="badge bad">incorrect</span>'
    )
    title = f"{tree.target} from {tree.nums}"
    metrics = [
        ("tokens total", f"{m.tokens_total:,}"),
        ("critical path", f"{m.tokens_critical_path:,}" + (f" ({len(cp)} requests)" if cp else "")),
        ("1 − cp/total", f"{eta:.3f}" if eta is not None else "–"),
        ("threads", f"{m.num_threads}"),
        ("requests", f"{m.num_requests}"),
        ("spawns", f"{m.num_spawns}"),
        ("max depth", f"{max((r.depth for r in threads), default=0)}"),
        ("max context", f"{m.max_context:,}"),
        ("wall time", _fmt_s(m.wall_s)),
        ("policy version", f"{tree.policy_version}"),
    ]
    present = sorted({END_GROUPS[r.end_reason] for r in threads}, key=list(GROUP_LABELS).index)
    counts = {g: sum(END_GROUPS[r.end_reason] == g for r in threads) for g in present}
    answer = (
        f"<pre class=\"answer\">{_esc(tree.final_answer)}</pre>"
        if tree.final_answer is not None
        else '<p class="note">No final answer (the root reached no goal).</p>'
    )
    check = f'<p class="note">Checker: {_esc(tree.check_reason)}</p>' if tree.check_reason else ""
    warn = ""
    if warnings:
        shown = "".join(f"<li>{_esc(w)}</li>" for w in warnings[:50])
        more = f"<li>… and {len(warnings) - 50} more</li>" if len(warnings) > 50 else ""
        warn = (
            f'<details class="warnings" open><summary>{len(warnings)} warning(s) about this tree</summary>'
            f"<ul>{shown}{more}</ul></details>"
        )
    rows = "".join(
        f'<tr data-req="{i}" class="end-{END_GROUPS[threads[i].end_reason]}{" cp" if i in cp else ""}">'
        f"<td>{i}</td><td>{threads[i].thread_id}</td><td>{threads[i].parent_thread_id}</td>"
        f"<td>{threads[i].depth}</td><td>{threads[i].segment}</td><td>{_esc(threads[i].end_reason.value)}</td>"
        f"<td>{len(threads[i].prompt_ids)}</td><td>{len(threads[i].output_ids)}</td>"
        f"<td>{threads[i].start_s:.3f}</td><td>{threads[i].end_s:.3f}</td>"
        f"<td>{'★' if i in cp else ''}</td><td class=\"detail\">{_esc(threads[i].detail)}</td></tr>"
        for i in order
    )
    return _PAGE.format(
        title=_esc(f"APR tree · {title}"),
        css=_CSS,
        heading=_esc(f"Countdown: reach {tree.target} from {tree.nums}"),
        verdict=verdict,
        problem_id=_esc(tree.problem_id or "–"),
        metrics="".join(f"<div><dt>{_esc(k)}</dt><dd>{_esc(v)}</dd></div>" for k, v in metrics),
        answer=answer,
        check=check,
        warnings=warn,
        legend="".join(
            f'<span class="chip end-{g}"><i></i>{_esc(GROUP_LABELS[g])}: {counts[g]}</span>' for g in present
        )
        + '<span class="chip cpchip"><i></i>critical path</span>',
        tree_svg=_tree_svg(tree, layout, cp),
        timeline=_timeline_svg(tree, order, cp),
        nreq=len(threads),
        table_open=" open" if len(threads) <= 40 else "",
        rows=rows,
        data=_script_json(data),
        js=_JS,
    )


def view_main(tree_json: Path, out: Path | None = None, index: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Write the page for tree `index` of `tree_json`; returns the page's path.

    Default output: next to the input with `.html` (`TREES.<index>.html` for a file holding a list).
    Token ids are decoded with the project tokenizer built in code, or the one saved in `tokenizer_dir`.
    """
    tree_json = Path(tree_json)
    tree, count = load_tree(tree_json, index)
    if out is None:
        out = tree_json.with_suffix(".html" if count == 1 else f".{index}.html")
    out = Path(out)
    if out.resolve() == tree_json.resolve():
        raise TreeFileError(f"{out}: the output would overwrite the input; pass another output path")
    from apr_ray.tokenizer import build_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else build_tokenizer()
    vocab = len(tokenizer)
    for i, rec in enumerate(tree.threads):
        for what, ids in (("prompt", rec.prompt_ids), ("output", rec.output_ids)):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                source = f"the tokenizer in {tokenizer_dir}" if tokenizer_dir else "the built-in tokenizer"
                raise TreeFileError(
                    f"{tree_json}: request {i} has {what} token id {bad}, outside {source} ({vocab} ids); "
                    "pass the tokenizer the tree was sampled with (--tokenizer DIR)"
                )
    page = render_tree_html(tree, lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# --- demonstrations as trees ---------------------------------------------------------------------


def tree_from_demo(demo: Demo, encode: Callable[[str], list[int]], tokens_per_s: float = 1000.0) -> TreeRecord:
    """A solver demonstration (`countdown.demos.flatten_apr`) as the TreeRecord a rollout would give.

    A demonstration has no sampler and no clock: logprobs are 0 (the solver is certain), and timings
    are simulated at `tokens_per_s` per thread with children running concurrently (a child starts when
    its parent's spawning segment ends; the parent resumes when its last child ends).
    """
    if not tokens_per_s > 0:
        raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
    seqs = demo.sequences
    last_seg = {s.thread_id: s.segment for s in seqs}
    # flatten_apr lists a segment, then the threads it spawned (depth first), then the next segment:
    # a thread's first request belongs to the latest earlier request of its parent.
    spawned: dict[int, list[int]] = {}
    latest: dict[int, int] = {}
    for i, s in enumerate(seqs):
        if s.segment == 0 and s.parent_thread_id >= 0:
            spawned.setdefault(latest[s.parent_thread_id], []).append(s.thread_id)
        latest[s.thread_id] = i
    threads: list[ThreadRecord] = []
    for i, s in enumerate(seqs):
        out = encode(s.completion)
        threads.append(ThreadRecord(
            request_id=i, thread_id=s.thread_id, parent_thread_id=s.parent_thread_id, depth=s.depth,
            segment=s.segment, prompt_ids=encode(s.prompt), output_ids=out, logprobs=[0.0] * len(out),
            end_reason=EndReason.EOS if s.segment == last_seg[s.thread_id] else EndReason.SPAWN,
            spawned_thread_ids=spawned.get(i, []),
        ))
    segs: dict[int, list[ThreadRecord]] = {}
    for rec in threads:
        segs.setdefault(rec.thread_id, []).append(rec)

    def run(tid: int, start: float) -> float:
        t = start
        for rec in segs[tid]:
            rec.start_s, rec.end_s = t, t + len(rec.output_ids) / tokens_per_s
            t = max([rec.end_s, *(run(c, rec.end_s) for c in rec.spawned_thread_ids)])
        return t

    wall = run(0, 0.0)
    root_last = [s for s in seqs if s.thread_id == 0][-1]
    cp_len, _ = critical_path(threads)
    metrics = TreeMetrics(
        tokens_total=sum(len(r.output_ids) for r in threads),
        tokens_critical_path=cp_len,
        num_threads=len(segs),
        num_requests=len(threads),
        num_spawns=sum(bool(r.spawned_thread_ids) for r in threads),
        max_context=max(len(r.prompt_ids) + len(r.output_ids) for r in threads),
        wall_s=wall,
    )
    return TreeRecord(
        target=demo.problem.target, nums=list(demo.problem.nums), threads=threads, metrics=metrics,
        final_answer=T.answer_path(root_last.prompt + root_last.completion), correct=demo.solved,
        check_reason="ok" if demo.solved else "no goal reached", problem_id=demo.problem.problem_id,
    )


# --- page template -------------------------------------------------------------------------------

_CSS = """
:root { --eos:#2e7d32; --eos-bg:#e8f5e9; --spawn:#1565c0; --spawn-bg:#e3f2fd; --limit:#e65100; --limit-bg:#fff3e0;
  --malformed:#c62828; --malformed-bg:#ffebee; --error:#6a1b9a; --error-bg:#f3e5f5; --cp:#f2a900; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; background: #fafafa; }
header { padding: 12px 18px; background: #fff; border-bottom: 1px solid #ddd; }
h1 { font-size: 19px; margin: 0 0 4px; }
h2 { font-size: 15px; margin: 0 0 6px; }
.sub, .note { color: #666; margin: 2px 0; }
.badge { font-size: 13px; padding: 2px 8px; border-radius: 10px; margin-left: 8px; vertical-align: middle; color: #fff; }
.badge.ok { background: var(--eos); } .badge.bad { background: var(--malformed); }
dl.metrics { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 8px 0; }
dl.metrics div { min-width: 90px; }
dt { color: #666; font-size: 12px; }
dd { margin: 0; font-weight: 600; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; word-break: break-word; font: 12px/1.35 ui-monospace, "SF Mono", Menlo, Consolas, monospace;
  background: #f4f4f4; border: 1px solid #e2e2e2; border-radius: 4px; padding: 6px 8px; margin: 4px 0; overflow: auto; }
pre.answer { max-height: 9em; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 14px; margin-top: 6px; font-size: 12px; }
.chip i { display: inline-block; width: 12px; height: 12px; border-radius: 3px; margin-right: 5px; vertical-align: -1px; }
.chip.end-eos i { background: var(--eos); }
.chip.end-spawn i { background: var(--spawn); }
.chip.end-limit i { background: var(--limit); }
.chip.end-malformed i { background: var(--malformed); } .chip.end-error i { background: var(--error); }
.chip.cpchip i { background: #fff; border: 3px solid var(--cp); }
.warnings { background: #fff8e1; border: 1px solid #ffe082; border-radius: 4px; padding: 4px 10px; margin: 6px 0; }
.warnings ul { margin: 4px 0; padding-left: 20px; max-height: 10em; overflow: auto; }
main { display: flex; gap: 0; height: calc(100vh - 40px); min-height: 420px; border-bottom: 1px solid #ddd; }
#tree-pane { flex: 1 1 auto; display: flex; flex-direction: column; min-width: 0; }
.toolbar { display: flex; gap: 6px; align-items: center; padding: 6px 10px; background: #fff; border-bottom: 1px solid #eee; flex-wrap: wrap; }
.toolbar button { font: inherit; padding: 2px 9px; cursor: pointer; }
.toolbar input[type=search] { font: inherit; width: 220px; padding: 2px 6px; }
.toolbar .count { color: #666; font-size: 12px; }
.scroll { flex: 1 1 auto; overflow: auto; background: #fff; }
#detail { flex: 0 0 42%; max-width: 720px; overflow: auto; padding: 10px 14px; background: #fff; border-left: 1px solid #ddd; }
#detail pre.out { max-height: 55vh; } #detail pre.prompt { max-height: 40vh; }
#detail table { border-collapse: collapse; font-size: 13px; margin-bottom: 6px; }
#detail td { padding: 1px 10px 1px 0; vertical-align: top; } #detail td:first-child { color: #666; }
.links button { font: inherit; font-size: 12px; margin: 2px 4px 2px 0; cursor: pointer; }
svg text { font: 12px ui-monospace, Menlo, Consolas, monospace; fill: #222; pointer-events: none; }
.node { cursor: pointer; outline: none; }
.node .box { fill: #fff; stroke: #9e9e9e; stroke-width: 1; }
.node .l1 { font-weight: 600; }
.node.end-eos .box { fill: var(--eos-bg); } .node.end-eos .band { fill: var(--eos); }
.node.end-spawn .box { fill: var(--spawn-bg); } .node.end-spawn .band { fill: var(--spawn); }
.node.end-limit .box { fill: var(--limit-bg); } .node.end-limit .band { fill: var(--limit); }
.node.end-malformed .box { fill: var(--malformed-bg); } .node.end-malformed .band { fill: var(--malformed); }
.node.end-error .box { fill: var(--error-bg); } .node.end-error .band { fill: var(--error); }
.node.cp .box { stroke: var(--cp); stroke-width: 4; }
.node.match .box { fill: #fff176; }
.node.sel .box, .node:focus .box { stroke: #111; stroke-width: 2.5; stroke-dasharray: 6 3; }
.node.dim { opacity: 0.25; }
.edge { fill: none; stroke: #9e9e9e; stroke-width: 1.3; }
.edge.join { stroke: #7e57c2; stroke-dasharray: 5 4; }
.edge.seq { stroke: #616161; }
.edge.cp { stroke: var(--cp); stroke-width: 3; }
.arrowhead { fill: #757575; }
.timeline .bar { cursor: pointer; stroke: none; }
.timeline .bar.end-eos { fill: var(--eos); }
.timeline .bar.end-spawn { fill: var(--spawn); }
.timeline .bar.end-limit { fill: var(--limit); }
.timeline .bar.end-malformed { fill: var(--malformed); } .timeline .bar.end-error { fill: var(--error); }
.timeline .bar.cp { stroke: var(--cp); stroke-width: 2; } .timeline .bar.sel { stroke: #111; stroke-width: 2; }
.timeline .tick { stroke: #eee; } .timeline .ticklabel, .timeline .rowlabel { font-size: 10px; fill: #666; }
section.more { padding: 6px 18px; }
section.more details { margin: 6px 0; } section.more summary { cursor: pointer; font-weight: 600; }
.tlwrap { max-height: 420px; overflow: auto; background: #fff; border: 1px solid #eee; }
table.reqs { border-collapse: collapse; font-size: 12px; background: #fff; font-variant-numeric: tabular-nums; }
table.reqs th, table.reqs td { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: right; }
table.reqs td.detail { text-align: left; max-width: 420px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
table.reqs tr[data-req] { cursor: pointer; } table.reqs tr.sel { background: #e3f2fd; }
table.reqs tr.end-limit td:nth-child(6) { color: var(--limit); font-weight: 600; }
table.reqs tr.end-malformed td:nth-child(6), table.reqs tr.end-error td:nth-child(6) { color: var(--malformed); font-weight: 600; }
"""

_JS = r"""
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("tree-data").textContent);
  const recs = data.records;
  const svg = document.getElementById("tree");
  const baseW = +svg.getAttribute("width"), baseH = +svg.getAttribute("height");
  const panel = document.getElementById("detail");
  let zoom = 1, selected = -1;

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
  function linkTo(req, label) {
    const b = el("button", label);
    b.addEventListener("click", () => select(req, true));
    return b;
  }
  function setZoom(z) {
    zoom = Math.max(0.05, Math.min(4, z));
    svg.setAttribute("width", String(baseW * zoom));
    svg.setAttribute("height", String(baseH * zoom));
    document.getElementById("zoomlabel").textContent = Math.round(zoom * 100) + "%";
  }
  function select(req, reveal) {
    if (!(req >= 0 && req < recs.length)) return;
    document.querySelectorAll(".sel").forEach((e) => e.classList.remove("sel"));
    document.querySelectorAll('[data-req="' + req + '"]').forEach((e) => e.classList.add("sel"));
    selected = req;
    if (reveal) {
      // centre the node in the tree pane only (scrollIntoView would also scroll the page)
      const node = svg.querySelector('.node[data-req="' + req + '"]');
      const box = svg.parentElement;
      if (node) {
        const n = node.getBoundingClientRect(), b = box.getBoundingClientRect();
        box.scrollLeft += n.left + n.width / 2 - (b.left + box.clientWidth / 2);
        box.scrollTop += n.top + n.height / 2 - (b.top + box.clientHeight / 2);
      }
    }
    history.replaceState(null, "", "#req=" + req);
    show(recs[req]);
  }
  function show(r) {
    panel.replaceChildren();
    panel.append(el("h2", "Request " + r.req + " · thread " + r.thread + " · segment " + r.segment));
    const t = el("table");
    const rows = [
      ["ended", r.end + (r.detail ? " — " + r.detail : "")],
      ["parent thread", r.parent < 0 ? "none (root)" : r.parent],
      ["depth", r.depth],
      ["tokens", r.prompt_tokens + " prompt + " + r.output_tokens + " output"],
      ["time", fmt(r.start, 3) + " – " + fmt(r.stop, 3) + " s (" + fmt(r.stop - r.start, 3) + " s)"],
      ["logprob", "mean " + fmt(r.lp_mean, 3) + ", min " + fmt(r.lp_min, 3)],
      ["critical path", r.cp ? "yes" : "no"],
      ["request_id", r.request_id],
    ];
    for (const [k, v] of rows) {
      const tr = el("tr");
      tr.append(el("td", k), el("td", v));
      t.append(tr);
    }
    panel.append(t);
    const links = el("div", null, "links");
    const segs = data.segments[String(r.thread)] || [];
    const pos = segs.indexOf(r.req);
    if (r.parent >= 0 && data.segments[String(r.parent)]) {
      const ps = data.segments[String(r.parent)];
      const spawner = ps.find((q) => recs[q].spawned.includes(r.thread));
      links.append(linkTo(spawner !== undefined ? spawner : ps[0], "↑ parent T" + r.parent));
    }
    if (pos > 0) links.append(linkTo(segs[pos - 1], "← segment " + recs[segs[pos - 1]].segment));
    if (pos >= 0 && pos + 1 < segs.length) links.append(linkTo(segs[pos + 1], "segment " + recs[segs[pos + 1]].segment + " →"));
    for (const c of r.spawned) {
      const cs = data.segments[String(c)];
      const b = cs ? linkTo(cs[0], "↓ child T" + c) : el("button", "child T" + c + " (no records)");
      if (!cs) b.disabled = true;
      links.append(b);
    }
    panel.append(links);
    panel.append(el("h2", "Output (" + r.output_tokens + " tokens)"));
    panel.append(el("pre", r.output, "out"));
    const d = el("details");
    d.append(el("summary", "Prompt (" + r.prompt_tokens + " tokens)"));
    d.append(el("pre", r.prompt, "prompt"));
    panel.append(d);
  }
  document.addEventListener("click", (ev) => {
    const target = ev.target.closest("[data-req]");
    if (target) select(+target.getAttribute("data-req"), !target.classList.contains("node"));
  });
  svg.addEventListener("keydown", (ev) => {
    const target = ev.target.closest(".node");
    if (target && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); select(+target.getAttribute("data-req"), false); }
  });
  document.getElementById("zoomin").addEventListener("click", () => setZoom(zoom * 1.25));
  document.getElementById("zoomout").addEventListener("click", () => setZoom(zoom / 1.25));
  document.getElementById("zoomfit").addEventListener("click", () => {
    const box = svg.parentElement;
    setZoom(Math.min(box.clientWidth / baseW, box.clientHeight / baseH, 1));
  });
  document.getElementById("zoom100").addEventListener("click", () => setZoom(1));
  document.getElementById("cponly").addEventListener("change", (ev) => {
    svg.querySelectorAll(".node").forEach((n) => n.classList.toggle("dim", ev.target.checked && !n.classList.contains("cp")));
  });
  document.getElementById("find").addEventListener("input", (ev) => {
    const q = ev.target.value;
    let hits = 0;
    svg.querySelectorAll(".node").forEach((n) => {
      const hit = q !== "" && recs[+n.getAttribute("data-req")].output.includes(q);
      n.classList.toggle("match", hit);
      hits += hit ? 1 : 0;
    });
    document.getElementById("findcount").textContent = q === "" ? "" : hits + " of " + recs.length + " outputs";
  });
  const m = /^#req=(\d+)$/.exec(location.hash);
  select(m ? +m[1] : 0, true);
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{heading}{verdict}</h1>
<p class="sub">problem {problem_id}</p>
<dl class="metrics">{metrics}</dl>
<details class="final" open><summary>Final answer</summary>{answer}{check}</details>
{warnings}
<div class="legend">{legend}</div>
</header>
<main>
<section id="tree-pane">
<div class="toolbar">
<button id="zoomout" title="zoom out">−</button><span id="zoomlabel">100%</span>
<button id="zoomin" title="zoom in">+</button>
<button id="zoomfit">fit</button><button id="zoom100">100%</button>
<label><input type="checkbox" id="cponly"> critical path only</label>
<input type="search" id="find" placeholder="find text in outputs"><span id="findcount" class="count"></span>
<span class="count">click a node for its text · solid edges: spawn · dashed: join</span>
</div>
<div class="scroll">{tree_svg}</div>
</section>
<aside id="detail"><p class="note">Click a node to see its prompt and output.</p></aside>
</main>
<section class="more">
<details open><summary>Timeline</summary><div class="tlwrap">{timeline}</div></details>
<details{table_open}><summary>Requests ({nreq})</summary>
<table class="reqs"><thead><tr><th>req</th><th>thread</th><th>parent</th><th>depth</th><th>seg</th><th>end</th>
<th>prompt tok</th><th>output tok</th><th>start s</th><th>end s</th><th>cp</th><th>detail</th></tr></thead>
<tbody>{rows}</tbody></table></details>
</section>
<script type="application/json" id="tree-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""

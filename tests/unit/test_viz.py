"""The thread-tree viewer: page structure (a node per request, an edge per spawn and join, the critical
path marked), layout geometry, escaping of untrusted text, TREE.json reading and its errors, large trees,
and (where a headless Chromium is installed) the page's script running in a browser."""

import json
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from apr_ray.countdown.demos import flatten_apr
from apr_ray.countdown.problems import Problem
from apr_ray.countdown.solvers import SolverConfig, solve_apr
from apr_ray.types import EndReason, ThreadRecord, TreeMetrics, TreeRecord, critical_path, tree_to_dict
from apr_ray.viz import (
    NODE_H,
    NODE_W,
    TreeFileError,
    layout_tree,
    load_tree,
    render_tree_html,
    tree_from_demo,
    view_main,
)

PROBLEM = Problem(56, (76, 11, 14, 69))  # its seed-18 depth-2 demo: 20 requests, 4 spawns, nested children


def encode_chars(text: str) -> list[int]:
    """Stand-in tokenizer for pure tests: one id per character."""
    return [ord(c) for c in text]


def decode_chars(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def demo_tree(encode=encode_chars, seed: int = 18, max_spawn_depth: int = 2) -> TreeRecord:
    demo = flatten_apr(PROBLEM, solve_apr(PROBLEM, SolverConfig(max_spawn_depth=max_spawn_depth), random.Random(seed)))
    return tree_from_demo(demo, encode)


class Page(HTMLParser):
    """Every element with its attributes and classes; the text of each <script>."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None], set[str]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script: dict | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs_d = dict(attrs)
        self.elements.append((tag, attrs_d, set((attrs_d.get("class") or "").split())))
        if tag == "script":
            self._in_script = attrs_d
            self.scripts.append((attrs_d, ""))

    def handle_startendtag(self, tag, attrs):
        attrs_d = dict(attrs)
        self.elements.append((tag, attrs_d, set((attrs_d.get("class") or "").split())))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_data(self, data):
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def having(self, tag: str, *classes: str) -> list[tuple[str, dict, set[str]]]:
        return [e for e in self.elements if e[0] == tag and set(classes) <= e[2]]

    def data(self) -> dict:
        (text,) = [t for a, t in self.scripts if a.get("id") == "tree-data"]
        return json.loads(text)


def expected_edges(tree: TreeRecord) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(spawn, join) edges as (from, to) request indices, derived from the records directly."""
    segs: dict[int, list[int]] = {}
    for i, r in enumerate(tree.threads):
        segs.setdefault(r.thread_id, []).append(i)
    spawn, join = set(), set()
    for i, r in enumerate(tree.threads):
        mine = segs[r.thread_id]
        nxt = mine[mine.index(i) + 1] if mine.index(i) + 1 < len(mine) else None
        for child in r.spawned_thread_ids:
            spawn.add((i, segs[child][0]))
            if nxt is not None:
                join.add((segs[child][-1], nxt))
    return spawn, join


def edges_of(page: Page, kind: str) -> list[tuple[int, int]]:
    return [(int(a["data-from"]), int(a["data-to"])) for _, a, _ in page.having("path", "edge", kind)]


def test_page_has_a_node_per_request_an_edge_per_spawn_and_join_and_marks_the_critical_path():
    tree = demo_tree()
    page = Page(render_tree_html(tree, decode_chars))
    nodes = page.having("g", "node")
    assert sorted(int(a["data-req"]) for _, a, _ in nodes) == list(range(len(tree.threads)))
    assert len(tree.threads) == 20 and tree.metrics.num_spawns == 4

    spawn, join = expected_edges(tree)
    assert len(spawn) == sum(len(r.spawned_thread_ids) for r in tree.threads) == 15
    assert sorted(edges_of(page, "spawn")) == sorted(spawn)
    assert sorted(edges_of(page, "join")) == sorted(join)
    assert edges_of(page, "seq") == []  # every segment after the first follows a join here

    cp_len, cp_ids = critical_path(tree.threads)
    marked = {int(a["data-req"]) for _, a, _ in page.having("g", "node", "cp")}
    assert len(marked) == len(cp_ids) == 5
    assert marked == set(cp_ids)  # request ids are list positions in this tree
    # an edge is on the critical path exactly when both its ends are
    for _, a, cls in page.having("path", "edge"):
        assert ("cp" in cls) == ({int(a["data-from"]), int(a["data-to"])} <= marked)
    assert page.data()["records"][cp_ids[-1]]["cp"] is True


def test_page_is_self_contained():
    text = render_tree_html(demo_tree(), decode_chars)
    page = Page(text)
    assert [a.get("type") for a, _ in page.scripts] == ["application/json", None]
    assert all("src" not in a for a, _ in page.scripts)
    assert len(page.having("style")) == 1
    for tag in ("link", "img", "iframe", "object", "embed", "base"):
        assert page.having(tag) == [], tag
    assert all("href" not in a and "src" not in a for _, a, _ in page.elements)
    for needle in ("http:", "https:", "//cdn", "@import"):
        assert needle not in text, needle
    assert "url(#arrow)" in text and text.count("url(") == text.count("url(#")
    (csp,) = [a for t, a, _ in page.elements if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in csp["content"]
    js = page.scripts[1][1]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink


def test_layout_puts_children_under_their_spawn_and_nothing_overlaps():
    tree = demo_tree(seed=5)  # 37 requests, two levels of children
    layout = layout_tree(tree.threads)
    assert layout.warnings == []
    assert sorted(layout.order) == list(range(len(tree.threads)))
    pos = layout.pos
    for kind, a, b in layout.edges:
        assert pos[b][1] >= pos[a][1] + NODE_H, (kind, a, b)  # every edge points down
    for tid in {r.thread_id for r in tree.threads}:  # a thread's segments stand in one column
        xs = {pos[i][0] for i, r in enumerate(tree.threads) if r.thread_id == tid}
        assert len(xs) == 1
    boxes = sorted(pos.values())
    for i, (x1, y1) in enumerate(boxes):
        assert 0 <= x1 and x1 + NODE_W <= layout.width and 0 <= y1 and y1 + NODE_H <= layout.height
        for x2, y2 in boxes[i + 1 :]:
            assert abs(x1 - x2) >= NODE_W or abs(y1 - y2) >= NODE_H, ((x1, y1), (x2, y2))


def rec(i, thread, parent, seg, out, end, spawned=(), depth=None, detail="") -> ThreadRecord:
    ids = encode_chars(out)
    return ThreadRecord(
        request_id=i, thread_id=thread, parent_thread_id=parent, depth=depth if depth is not None else int(parent >= 0),
        segment=seg, prompt_ids=encode_chars(f"prompt of request {i}\n"), output_ids=ids,
        logprobs=[-0.5] * len(ids), end_reason=end, start_s=0.1 * i, end_s=0.1 * i + 0.05,
        spawned_thread_ids=list(spawned), detail=detail,
    )


def small_tree(threads: list[ThreadRecord], final_answer: str | None = "path\n", problem_id: str = "p1") -> TreeRecord:
    cp_len, _ = critical_path(threads)
    metrics = TreeMetrics(
        tokens_total=sum(len(r.output_ids) for r in threads), tokens_critical_path=cp_len,
        num_threads=len({r.thread_id for r in threads}), num_requests=len(threads),
        num_spawns=sum(bool(r.spawned_thread_ids) for r in threads), max_context=100, wall_s=1.5,
    )
    return TreeRecord(target=24, nums=[1, 2, 3, 4], threads=threads, metrics=metrics, final_answer=final_answer,
                      correct=final_answer is not None, problem_id=problem_id, policy_version=7)


def test_untrusted_text_is_escaped_everywhere():
    attack = "<script>alert(1)</script>"
    threads = [
        rec(0, 0, -1, 0, "spawn block", EndReason.SPAWN, spawned=[1]),
        rec(1, 1, 0, 0, f"x {attack} <img src=x onerror=alert(2)> & </pre>", EndReason.MALFORMED,
            detail='bad line "<b>bold</b>"'),
        rec(2, 0, -1, 1, "done", EndReason.EOS),
    ]
    tree = small_tree(threads, final_answer=f"</pre>{attack}", problem_id='"><i>pid</i>')
    text = render_tree_html(tree, decode_chars)
    page = Page(text)
    assert attack not in text and "<img" not in text and "<b>" not in text and "<i>pid" not in text
    assert len(page.scripts) == 2 and page.having("img") == [] and page.having("b") == []
    assert len(page.having("i")) == len(page.having("span", "chip"))  # only the legend's colour swatches
    assert "&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the final answer, escaped
    assert "bad line &quot;&lt;b&gt;bold&lt;/b&gt;&quot;" in text  # detail in the requests table
    records = page.data()["records"]  # the panel shows these with textContent: verbatim, inert
    assert records[1]["output"] == f"x {attack} <img src=x onerror=alert(2)> & </pre>"
    assert records[1]["detail"] == 'bad line "<b>bold</b>"'


def test_end_reasons_are_colour_coded_and_counted_in_the_legend():
    threads = [
        rec(0, 0, -1, 0, "a", EndReason.SPAWN, spawned=[1, 2, 3, 4, 5]),
        rec(1, 1, 0, 0, "b", EndReason.EOS),
        rec(2, 2, 0, 0, "c", EndReason.MAX_TOKENS, detail="max_tokens=4"),
        rec(3, 3, 0, 0, "d", EndReason.TIMEOUT),
        rec(4, 4, 0, 0, "e", EndReason.MALFORMED),
        rec(5, 5, 0, 0, "f", EndReason.ERROR),
        rec(6, 0, -1, 1, "g", EndReason.CONTEXT),
    ]
    page = Page(render_tree_html(small_tree(threads), decode_chars))
    groups = {int(a["data-req"]): {c for c in cls if c.startswith("end-")} for _, a, cls in page.having("g", "node")}
    assert groups == {0: {"end-spawn"}, 1: {"end-eos"}, 2: {"end-limit"}, 3: {"end-limit"},
                      4: {"end-malformed"}, 5: {"end-error"}, 6: {"end-limit"}}
    legend = {c for _, _, cls in page.having("span", "chip") for c in cls if c.startswith("end-")}
    assert legend == {"end-spawn", "end-eos", "end-limit", "end-malformed", "end-error"}
    assert "hit a limit (max_tokens, context, tree_tokens, timeout, depth): 3" in render_tree_html(
        small_tree(threads), decode_chars)


def test_inconsistent_records_still_show_every_request_with_warnings():
    threads = [
        rec(0, 0, -1, 0, "a", EndReason.SPAWN, spawned=[1, 9]),  # thread 9 never ran
        rec(1, 1, 0, 0, "b", EndReason.EOS),
        rec(2, 0, -1, 1, "c", EndReason.EOS),
        rec(3, 5, 4, 0, "orphan", EndReason.EOS, depth=2),  # its parent thread 4 has no records
    ]
    tree = small_tree(threads)
    tree.metrics.tokens_total += 3
    text = render_tree_html(tree, decode_chars)
    page = Page(text)
    assert len(page.having("g", "node")) == 4
    assert "spawned thread 9, which has no records" in text
    assert "thread 5 (parent 4) is not reachable from the root" in text
    assert "metrics.tokens_total is 12, the records hold 9 output tokens" in text


def test_a_large_tree_renders_quickly_and_keeps_text_out_of_the_markup():
    """~300 requests: root with two fans of 12 children, each child fanning out 10 grandchildren."""
    threads: list[ThreadRecord] = []
    long_out = "Exploring Operation: 1+2=3, Resulting Numbers: [3]\n" * 8  # ~400 chars per request

    def add(thread, parent, seg, depth, end, spawned=()):
        threads.append(rec(len(threads), thread, parent, seg, long_out, end, spawned=spawned, depth=depth))

    next_id = iter(range(1, 10_000))
    root_kids = [[next(next_id) for _ in range(12)] for _ in range(2)]
    for k, kids in enumerate(root_kids):
        add(0, -1, k, 0, EndReason.SPAWN, kids)
        for kid in kids:
            grandkids = [next(next_id) for _ in range(10)]
            add(kid, 0, 0, 1, EndReason.SPAWN, grandkids)
            for g in grandkids:
                add(g, kid, 0, 2, EndReason.EOS)
            add(kid, 0, 1, 1, EndReason.EOS)
    add(0, -1, 2, 0, EndReason.EOS)
    assert len(threads) == 291
    text = render_tree_html(small_tree(threads), decode_chars)  # its time: bench/unit_timings.py
    page = Page(text)
    assert len(page.having("g", "node")) == 291 and len(page.having("rect", "bar")) == 291
    outside_data = text.replace(page.scripts[0][1], "")
    assert "Resulting Numbers" not in outside_data  # thread text lives only in the data, shown on click
    assert len(text) < 291 * len(long_out) * 2 + 400_000


# --- files: view_main / load_tree ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from apr_ray.tokenizer import build_tokenizer

    return build_tokenizer()


def token_tree(tokenizer, seed: int) -> TreeRecord:
    return demo_tree(lambda s: tokenizer.encode(s, add_special_tokens=False), seed=seed, max_spawn_depth=1)


def test_view_main_writes_next_to_the_input_and_decodes_with_the_built_in_tokenizer(tmp_path, tokenizer):
    tree = token_tree(tokenizer, 18)
    src = tmp_path / "tree.json"
    src.write_text(json.dumps(tree_to_dict(tree)))
    out = view_main(src, None, 0, None)
    assert out == tmp_path / "tree.html"
    data = Page(out.read_text()).data()
    demo = flatten_apr(PROBLEM, solve_apr(PROBLEM, SolverConfig(max_spawn_depth=1), random.Random(18)))
    assert [r["output"] for r in data["records"]] == [s.completion for s in demo.sequences]
    assert [r["prompt"] for r in data["records"]] == [s.prompt for s in demo.sequences]
    with pytest.raises(TreeFileError, match=r"tree\.json: holds one tree \(index 0\); index 1 is out of range"):
        view_main(src, None, 1, None)


def test_a_list_of_trees_is_chosen_with_index(tmp_path, tokenizer):
    trees = [token_tree(tokenizer, seed) for seed in (1, 2, 3)]
    for t, target in zip(trees, (31, 32, 33)):
        t.target = target  # tell them apart in the page heading
    src = tmp_path / "trees.json"
    src.write_text(json.dumps([tree_to_dict(t) for t in trees]))
    out = view_main(src, None, 1, None)
    assert out == tmp_path / "trees.1.html"
    assert "Countdown: reach 32 from" in out.read_text()
    explicit = view_main(src, tmp_path / "sub" / "x.html", 2, None)
    assert "Countdown: reach 33 from" in explicit.read_text()
    with pytest.raises(TreeFileError, match=r"trees\.json: holds 3 trees \(index 0\.\.2\); index 3 is out of range"):
        view_main(src, None, 3, None)
    assert load_tree(src, 0)[0] == trees[0] and load_tree(src, 0)[1] == 3


def test_view_main_with_a_saved_tokenizer_and_ids_outside_its_vocabulary(tmp_path, tokenizer):
    from apr_ray.tokenizer import save_tokenizer

    tok_dir = save_tokenizer(tokenizer, tmp_path / "tok")
    tree = token_tree(tokenizer, 18)
    src = tmp_path / "tree.json"
    src.write_text(json.dumps(tree_to_dict(tree)))
    out = view_main(src, tmp_path / "page.html", 0, tok_dir)
    assert Page(out.read_text()).data()["records"][0]["output"] == tokenizer.decode(tree.threads[0].output_ids)
    tree.threads[2].output_ids[1] = len(tokenizer) + 5
    src.write_text(json.dumps(tree_to_dict(tree)))
    with pytest.raises(TreeFileError, match=r"tree\.json: request 2 has output token id \d+, outside .*--tokenizer DIR"):
        view_main(src, None, 0, None)


def good_tree_dict() -> dict:
    threads = [rec(0, 0, -1, 0, "a", EndReason.SPAWN, spawned=[1]), rec(1, 1, 0, 0, "b", EndReason.EOS),
               rec(2, 0, -1, 1, "c", EndReason.EOS)]
    return tree_to_dict(small_tree(threads))


def broken(edit) -> str:
    obj = good_tree_dict()
    edit(obj)
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"target": 24, "nums": [1, 2', r"not valid JSON: .* at line 1 column \d+"),
        ("7", r"expected a tree object or a list of tree objects, got int"),
        ("[]", r"the list of trees is empty"),
        (broken(lambda o: o.pop("threads")), r"tree: missing key 'threads' \(TreeRecord\)"),
        (broken(lambda o: o["threads"][1].update(end_reason="oops")),
         r"tree\.threads\[1\]\.end_reason: expected one of 'eos', 'spawn', .*got 'oops'"),
        (broken(lambda o: o["threads"][0]["output_ids"].append("x")), r"tree\.threads\[0\]\.output_ids\[1\]: expected an integer"),
        (broken(lambda o: o["threads"][2].update(colour="red")), r"tree\.threads\[2\]: unknown key\(s\) \['colour'\]"),
        (broken(lambda o: o["metrics"].update(wall_s="fast")), r"tree\.metrics\.wall_s: expected a number, got 'fast'"),
        (broken(lambda o: o.update(final_answer=3)), r"tree\.final_answer: expected a string or null, got 3"),
        ("[" + broken(lambda o: None) + "," + broken(lambda o: o.update(threads={})) + "]",
         r"tree\[1\]\.threads: expected a list of .*got dict"),
    ],
)
def test_bad_files_fail_with_the_file_and_what_is_wrong(tmp_path, content, message):
    src = tmp_path / "bad_tree.json"
    src.write_text(content)
    index = 1 if content.startswith("[{") else 0
    with pytest.raises(TreeFileError, match=rf"^{src}: {message}"):
        load_tree(src, index)


def test_missing_file_and_overwriting_the_input_are_refused(tmp_path):
    with pytest.raises(TreeFileError, match=rf"^{tmp_path / 'nope.json'}: no such file"):
        view_main(tmp_path / "nope.json")
    src = tmp_path / "tree.html"
    src.write_text(json.dumps(good_tree_dict()))
    with pytest.raises(TreeFileError, match="would overwrite the input"):
        view_main(src)


def test_tree_from_demo_is_a_consistent_rollout_record():
    tree = demo_tree()
    assert tree.correct and tree.final_answer is not None and tree.final_answer.endswith("56,56 equal: Goal Reached\n")
    by_thread = {}
    for r in tree.threads:
        by_thread.setdefault(r.thread_id, []).append(r)
    for r in tree.threads:
        segs = by_thread[r.thread_id]
        assert r.end_reason == (EndReason.EOS if r is segs[-1] else EndReason.SPAWN)
        assert bool(r.spawned_thread_ids) == (r.end_reason == EndReason.SPAWN)
        for child in r.spawned_thread_ids:
            first = by_thread[child][0]
            assert first.parent_thread_id == r.thread_id and first.depth == r.depth + 1
            assert first.start_s == pytest.approx(r.end_s)  # children start when the spawn ends
        if r.spawned_thread_ids and r is not segs[-1]:
            nxt = segs[segs.index(r) + 1]
            assert nxt.start_s == pytest.approx(max(by_thread[c][-1].end_s for c in r.spawned_thread_ids))
    assert tree.metrics.wall_s == pytest.approx(by_thread[0][-1].end_s)
    assert tree.metrics.tokens_critical_path == critical_path(tree.threads)[0] < tree.metrics.tokens_total


CHROMIUM = next((shutil.which(b) for b in ("chromium-headless-shell", "chromium", "chromium-browser") if shutil.which(b)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine")
def test_page_script_runs_in_headless_chromium(tmp_path):
    """The script selects the request named in the URL and shows its text, as text."""
    threads = [
        rec(0, 0, -1, 0, "spawn", EndReason.SPAWN, spawned=[1]),
        rec(1, 1, 0, 0, "<script>alert(1)</script><img src=x>", EndReason.MALFORMED),
        rec(2, 0, -1, 1, "done", EndReason.EOS),
    ]
    page = tmp_path / "tree.html"
    page.write_text(render_tree_html(small_tree(threads), decode_chars))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"{page.as_uri()}#req=1"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "<h2>Request 1 · thread 1 · segment 0</h2>" in dom
    assert '<pre class="out">&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x&gt;</pre>' in dom
    assert re.search(r'<g class="node end-malformed cp sel" data-req="1"', dom)  # selected, highlighted
    assert re.search(r'<tr data-req="1" class="[^"]*\bsel"', dom)  # and its row in the table
    assert "<img" not in dom.split("<body>")[1] and dom.count("<script") == 2

"""The tree viewer in a real browser (Debian's Chromium driven by Playwright), as a user opens it: the page
of a solver's spawn/join tree written by `apr-ray view`, a click on a child thread's node, its prompt
expanded, a screenshot; then what is on the screen is checked, pixels included.

CI installs Chromium (.ci/run) and sets APR_RAY_REQUIRE_BROWSER=1, so there a missing browser fails the
test instead of skipping it."""

from __future__ import annotations

import io
import json
import os
import random
import shutil

import pytest

from apr_ray.countdown.demos import flatten_apr
from apr_ray.countdown.problems import Problem
from apr_ray.countdown.solvers import SolverConfig, solve_apr
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import tree_to_dict
from apr_ray.viz import tree_from_demo, view_main

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-headless-shell", "chromium-browser")
                 if shutil.which(b)), None)
REQUIRED = os.environ.get("APR_RAY_REQUIRE_BROWSER") == "1"
# Chromium's own calls home are refused on a closed network, many at a time: switch them off
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SELECTED_ROW = (0xE3, 0xF2, 0xFD)  # `table.reqs tr.sel` in the page's CSS


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = "Chromium" if CHROMIUM is None else "Playwright" if sync_playwright is None else ""
    if missing:
        if REQUIRED:
            pytest.fail(f"APR_RAY_REQUIRE_BROWSER=1 but {missing} is not installed (.ci/run installs both)")
        pytest.skip(f"no {missing} on this machine")
    return sync_playwright


@pytest.fixture
def page_path(tmp_path):
    problem = Problem(56, (76, 11, 14, 69))  # its seed-18 demo spawns children that spawn again
    demo = flatten_apr(problem, solve_apr(problem, SolverConfig(max_spawn_depth=2), random.Random(18)))
    tokenizer = build_tokenizer()
    tree = tree_from_demo(demo, lambda text: tokenizer.encode(text, add_special_tokens=False))
    src = tmp_path / "tree.json"
    src.write_text(json.dumps(tree_to_dict(tree)))
    return view_main(src), tree


def test_a_child_thread_opened_in_chromium_shows_its_text_and_is_highlighted(page_path, tmp_path):
    from PIL import Image

    sync_playwright = browser_or_skip()
    path, tree = page_path
    child = next(r for r in tree.threads if r.depth == 2)  # a grandchild: two spawns below the root
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            page.locator(f'g.node[data-req="{child.request_id}"]').click()
            panel_title = f"Request {child.request_id} · thread {child.thread_id} · segment {child.segment}"
            page.get_by_role("heading", name=panel_title).wait_for()
            page.get_by_text(f"Prompt ({len(child.prompt_ids)} tokens)").click()  # expand the thread's prompt
            prompt = page.locator("pre.prompt")
            prompt.wait_for(state="visible")
            requests = page.locator("details", has=page.locator("summary", has_text="Requests"))
            if not requests.evaluate("d => d.open"):  # open by default only for small trees
                requests.locator("summary").click()
            row = page.locator(f'table.reqs tr[data-req="{child.request_id}"]')
            page.screenshot(path=str(tmp_path / "viewer.png"))
            row_shot = row.screenshot()  # scrolled into view: what the user sees of the thread's row
            url, output = page.url, page.locator("pre.out").inner_text()
            prompt_text = prompt.inner_text()
        finally:
            browser.close()

    assert not errors, errors
    assert url.endswith(f"#req={child.request_id}")
    tokenizer = build_tokenizer()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731  (as `apr-ray view`)
    assert output == decode(child.output_ids) and prompt_text == decode(child.prompt_ids)
    assert (tmp_path / "viewer.png").stat().st_size > 10_000  # a rendered page, not a blank one
    image = Image.open(io.BytesIO(row_shot)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    highlighted = sum(n for n, c in colours if c == SELECTED_ROW)
    assert highlighted > 0.5 * image.width * image.height, f"row not highlighted: {sorted(colours)[-3:]}"


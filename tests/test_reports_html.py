"""The HTML leaderboard: content, escaping of every user string, self-containment, and a real browser.

The browser test drives Debian's chromium headless through playwright
(executable_path=/usr/bin/chromium; playwright downloads nothing). Outside CI
it is skipped when chromium is missing; with the CI environment variable set
it must run.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from reports_fixtures import copy_all, copy_run, fixture_summary

from robusteval.reports.loading import load_runs
from robusteval.reports.paths import slug
from robusteval.reports.report import write_report
from robusteval.reports.tables import leaderboard

EVIL = "<script>alert(1)</script>"
EVIL_FLAG = '<img src=x onerror="alert(2)"> & "quotes"'
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


class _Elements(HTMLParser):
    """Every element and its attributes, as a browser's tokenizer sees them."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs_dir = root / "runs"
    copy_all(runs_dir)

    def evil(summary):
        summary["model"] = EVIL
        summary["flags"] = [EVIL_FLAG]

    copy_run("standard-autoattack-L2", runs_dir, evil, new_name="evil")
    runs = load_runs([runs_dir])
    out = root / "reports" / "leaderboard.html"
    written = write_report(runs, out, command=f"robusteval report {runs_dir}/*", notes=[f"Grid note {EVIL}"])
    return {"runs": runs, "out": out, "html": out.read_text(encoding="utf-8"), "report": written}


def test_user_strings_are_escaped_everywhere(report):
    page = report["html"]
    assert EVIL not in page
    assert "<img src=x" not in page and 'onerror="alert' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # rendered as text
    assert "Grid note &lt;script&gt;" in page  # the report's notes too
    assert "&lt;img src=x onerror=" in page
    elements = _Elements(page).elements
    tags = [tag for tag, _ in elements]
    # The only script element is the page's own sorter; no element comes from a run's strings.
    assert tags.count("script") == 1 and "img" not in tags
    # No event-handler attribute anywhere (the inline SVGs included).
    assert not [(tag, name) for tag, attrs in elements for name in attrs if name.startswith("on")]
    # The escaped strings come back as the original text in attribute values.
    assert any(attrs.get("data-system") == EVIL for _, attrs in elements)


def test_page_is_self_contained(report):
    page = report["html"]
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    elements = _Elements(page).elements
    assert not [tag for tag, _ in elements if tag in ("link", "img", "iframe", "object", "embed", "image")]
    assert not [tag for tag, attrs in elements if "src" in attrs]
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.I)
    # Every figure is inline SVG (with prefixed ids so figures do not clash); links point to local files.
    figures = report["report"].figures.all()
    assert [tag for tag, _ in elements].count("svg") >= len(figures)
    ids = [attrs["id"] for _, attrs in elements if "id" in attrs]
    assert len(ids) == len(set(ids))
    hrefs = [attrs.get("href") or attrs.get("xlink:href") for _, attrs in elements]
    for href in (h for h in hrefs if h and not h.startswith("#")):
        assert not href.startswith(("http:", "https:", "//")), href
        assert (report["out"].parent / href).is_file(), href


def test_figures_are_shown_at_their_size_link_their_svg_and_the_model_identities(report):
    page = report["html"]
    written = report["report"].figures
    for figure in written.all():
        svg = figure.svg.relative_to(report["out"].parent).as_posix()
        # The inline figure is itself a link to its SVG file (open at full size), and the caption links both files.
        block = re.search(rf'<figure id="[^"]*figure-{re.escape(slug(figure.name))}">(.*?)</figure>', page, re.S)
        assert block, figure.name
        assert re.match(rf'\s*<a class="open" href="{re.escape(svg)}"[^>]*>\s*<svg ', block.group(1)), figure.name
        assert f'<a href="{svg}">SVG</a>' in block.group(1)
    assert '<a href="figures/identities.json">figures/identities.json</a>' in page
    assert written.identities == report["out"].parent / "figures" / "identities.json"
    # No CSS stretches a figure past its own size (a 6-inch figure blown up to the page width reads at 20px).
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert "figure svg { display: block; max-width: 100%; height: auto; }" in style
    assert not re.search(r"svg\s*\{[^}]*(?<![-\w])width:\s*100%", style)


def test_leaderboard_rows_columns_and_values(report):
    page = report["html"]
    table = re.search(r'<table class="sortable leaderboard" id="leaderboard-digits".*?</table>', page, re.S).group(0)
    systems = re.findall(r'<tr class="[^"]*" data-system="([^"]*)"', table)
    board, _ = leaderboard(report["runs"])
    assert len(systems) == len(board) == 5
    for header in ("clean accuracy (%)", "AutoAttack L∞ ε=0.1 (%)", "best-known L∞ ε=0.1 (%)",
                   "AutoAttack L2 ε=1 (%)", "certified r=0.5 (%)", "certified r=1 (%)", "flags"):
        assert f">{header}</button>" in table
    gaussian = re.search(r'data-system="gaussian">(.*?)</tr>', table, re.S).group(1)
    aa = fixture_summary("gaussian-autoattack-Linf")["curve"][1]["robust_accuracy"]
    assert f'data-sort="{aa!r}">{100 * aa:.1f}</td>' in gaussian
    assert 'class="unreliable"' in table  # the flagged systems carry the mark


def test_model_sections_cards_and_provenance(report):
    page = report["html"]
    gaussian = re.search(r'<section id="model-gaussian".*?</section>', page, re.S).group(0)
    assert "Gaussian data augmentation" in gaussian and "Cohen, Rosenfeld &amp; Kolter 2019" in gaussian
    assert "capabilities" in gaussian and "gaussian-digits.safetensors" in gaussian
    assert "robusteval certify --model gaussian --sigma 0.5" in gaussian  # the run's command
    assert "0123456789abcdef0123456789abcdef01234567" in gaussian  # its git commit
    assert gaussian.count("<figure") == 3  # L∞, L2, certified
    joint = re.search(r'<section id="model-toy-joint".*?</section>', page, re.S).group(0)
    assert "Not a registered robusteval model" in joint
    denoiser = re.search(r'<section id="model-dncnn\+standard".*?</section>', page, re.S).group(0)
    assert "Denoised smoothing" in denoiser and "<figure" in denoiser  # its PSNR figure


def test_other_formats_write_their_main_file(tmp_path):
    runs = load_runs([copy_run("gaussian-certify-0.25", tmp_path / "runs"),
                      copy_run("gaussian-autoattack-Linf", tmp_path / "runs")])
    md = write_report(runs, tmp_path / "md" / "report.md", "md")
    text = md.main.read_text()
    assert "## Leaderboard" in text
    assert "![Robust accuracy vs ε (digits, L∞)](figures/robust_digits_Linf.png)" in text
    assert "([figures/identities.json](figures/identities.json))" in text
    assert (tmp_path / "md" / "figures" / "identities.json").is_file()
    csv = write_report(runs, tmp_path / "csv" / "board.csv", "csv")
    assert csv.main.read_text().splitlines()[0].startswith("dataset,system,model,defense,clean")
    latex = write_report(runs, tmp_path / "tex" / "tables.tex", "latex")
    assert latex.main.read_text().count("\\begin{tabular}") == 3
    with pytest.raises(ValueError, match="unknown report format"):
        write_report(runs, tmp_path / "x.html", "pdf")


# --- the browser test -------------------------------------------------------------------------
def _chromium() -> str:
    """Path of Debian's chromium; skip (or fail in CI) when it or playwright is missing."""
    in_ci = bool(os.environ.get("CI"))
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium is not installed (Debian: apt-get install chromium chromium-driver)"
        if in_ci:
            pytest.fail(message + "; CI is set, so the browser test must run")
        pytest.skip(message + "; the browser test runs in CI")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if in_ci:
            pytest.fail("the playwright package is missing (pip install -e '.[dev]'); CI must run the browser test")
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    return path


def test_browser_renders_and_sorts_the_leaderboard(report, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    board, _ = leaderboard(report["runs"])
    expected = board["system"].tolist()
    clean = dict(zip(board["system"], board["clean"]))
    by_clean = sorted(expected, key=lambda s: (math.isnan(clean[s]), -clean[s] if not math.isnan(clean[s]) else 0))
    assert by_clean != expected  # the click must visibly change the order
    requests, dialogs, errors = [], [], []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=chromium,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report["out"].as_uri())
            rows = "#leaderboard-digits tbody tr"

            def order():
                return page.eval_on_selector_all(rows, "rows => rows.map(r => r.dataset.system)")

            assert order() == expected
            # The malicious model name is shown as text.
            assert EVIL in page.inner_text("#leaderboard-digits")
            header = page.locator("#leaderboard-digits thead th", has_text="clean accuracy")
            header.locator("button").click()
            assert order() == by_clean
            assert header.get_attribute("aria-sort") == "descending"
            header.locator("button").click()
            assert header.get_attribute("aria-sort") == "ascending"
            ascending = order()
            assert ascending[: len(by_clean)] != by_clean
            present = [s for s in by_clean if not math.isnan(clean[s])]
            assert [s for s in ascending if s in present] == sorted(present, key=lambda s: clean[s])
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "leaderboard.png"), full_page=True)
        finally:
            context.close()
    assert dialogs == [] and errors == []
    assert requests == [report["out"].as_uri()]  # no network request, nothing else loaded
    assert (ARTIFACTS / "leaderboard.png").stat().st_size > 10_000


def test_inline_svg_prefixes_ids_and_refuses_active_content(tmp_path):
    from robusteval.reports.html import inline_svg

    good = tmp_path / "good.svg"
    good.write_text('<?xml version="1.0"?>\n<!DOCTYPE svg>\n<svg xmlns="http://www.w3.org/2000/svg">'
                    '<defs><path id="m1" d="M0 0"/><clipPath id="c1"/></defs><use xlink:href="#m1"/>'
                    '<g clip-path="url(#c1)"><text>javascript: onload= is text here</text></g></svg>')
    markup = str(inline_svg(good, "f7"))
    assert markup.startswith('<svg role="img"') and "<?xml" not in markup and "DOCTYPE" not in markup
    assert 'id="f7-m1"' in markup and 'href="#f7-m1"' in markup and "url(#f7-c1)" in markup
    for bad in ('<svg><script>alert(1)</script></svg>', '<svg onload="alert(1)"></svg>',
                '<svg><use href="https://example.org/x.svg#a"/></svg>', '<svg><a xlink:href="javascript:x"/></svg>',
                '<svg><foreignObject></foreignObject></svg>'):
        path = tmp_path / "bad.svg"
        path.write_text(bad)
        with pytest.raises(ValueError, match="active content"):
            inline_svg(path, "f0")

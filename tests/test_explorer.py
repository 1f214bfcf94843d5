"""The explorer page (patchmap/explorer.py): its messages for input it cannot show as usual, without a browser,
and the page of a finished tiny run driven in headless Chromium through Selenium: cells, hover, a clicked
cell's examples against divergence.nc, the metric selector, the filters, the console. The browser tests are
skipped without Chromium and chromedriver (Debian: apt-get install chromium chromium-driver), unless
PATCHMAP_REQUIRE_BROWSER=1 (set by .ci/run), where that is a failure.
"""

import base64
import hashlib
import html
import json
import shutil
import tempfile
import zlib

import numpy as np
import pytest
import xarray as xr
from workflow_utils import TINY, skip_unless_required, snakemake, write_config

from patchmap import explorer
from patchmap.errors import UserError
from patchmap import heads
from patchmap.explorer_demo import paper_sized_run

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1200"]
READY_SECONDS = 60  # a loaded 2-core machine takes a few seconds, not a minute


# ---- without a browser


def small_run(examples=8):
    """A made-up run (3 sites x 4 layers) with top tokens, and its pairs."""
    return paper_sized_run(examples=examples, layers=4, vocab=400)


def without_top_tokens(ds):
    return ds.drop_vars(list(explorer.TOP_TOKENS) + ["token_id"])


def unpacked(page, element_id):
    """The bytes a base64, deflated <script> element of the page holds."""
    start = page.index(f'id="{element_id}">') + len(f'id="{element_id}">')
    return zlib.decompress(base64.b64decode(page[start:page.index("</script>", start)]))


def page_arrays(page):
    """The page's run data as (header, {name: array}), decoded as explorer.js decodes it."""
    data = unpacked(page, "run-data")
    length = int.from_bytes(data[:4], "little")
    header = json.loads(data[4:4 + length])
    arrays = {}
    for name, spec in header["arrays"].items():
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        count = int(np.prod(spec["shape"]))
        start = 4 + length + spec["offset"]
        planes = np.frombuffer(data[start:start + count * dtype.itemsize], np.uint8).reshape(dtype.itemsize, count)
        arrays[name] = planes.T.copy().view(dtype).reshape(spec["shape"])
    return header, arrays


def test_the_page_holds_the_files_numbers_exactly():
    ds, pairs = small_run()
    page = explorer.explorer_html(ds, pairs)
    header, arrays = page_arrays(page)
    for name in explorer.METRICS:
        np.testing.assert_array_equal(arrays[name], ds[name].values)
    np.testing.assert_array_equal(arrays["top_prob"], ds["top_prob"].values)
    ids = np.asarray(header["tokens"]["ids"])
    np.testing.assert_array_equal(ids[arrays["top_index"]], ds["top_token"].values)
    np.testing.assert_array_equal(ids[arrays["target_answer_index"]], pairs["target_answer"].values)
    texts = dict(zip(ds["token_id"].values.tolist(), ds["token_text"].values))
    assert header["tokens"]["texts"] == [texts[i] for i in ids]
    assert header["examples"]["id"] == list(ds["example"].values)
    assert header["sites"] == ["Subj.", "Attn.", "Last."] and header["layers"] == [0, 1, 2, 3]
    span = header["examples"]["target_span"][0]
    assert ds["target_prompt"].values[0][span[0]:span[1]] == pairs["target_subject"].values[0]
    assert hashlib.sha256(unpacked(page, "plotly-js")).hexdigest() == explorer.PLOTLY_JS_SHA256


def test_the_vendored_plotly_js_is_the_release_it_names():
    """patchmap/vendor/plotly-cartesian.min.js is unchanged from its npm release (patchmap/vendor/README.md)."""
    assert hashlib.sha256(explorer.PLOTLY_JS.read_bytes()).hexdigest() == explorer.PLOTLY_JS_SHA256
    assert explorer.PLOTLY_JS.read_text()[:80].startswith("/**\n* plotly.js (cartesian - minified) v4.1.1")


def test_a_head_site_shows_its_heads_as_rows_after_the_other_sites():
    """A run with head sites (patchmap.heads: along head_site, variables prefixed head_): each head is a row
    of the heatmap, "<head site> <head>", holding that head's numbers, so the head site is a head x layer block."""
    ds, pairs = small_run()
    n, layers, heads_ = ds.sizes["example"], ds.sizes["layer"], 3
    per_head = {m: (("example", "site", "layer", "head"),
                    np.broadcast_to(np.arange(heads_, dtype=ds[m].dtype), (n, 1, layers, heads_)).copy())
                for m in ("js", "kl_patched_target", "kl_target_patched", "p_target_answer", "p_source_answer", "flip")}
    for end in ("low", "high"):
        per_head[f"js_ci_{end}"] = (("site", "layer", "head"), np.zeros((1, layers, heads_)))
    for name in ("top_token", "top_prob"):  # each head: the first site's top tokens
        per_head[name] = (("example", "site", "layer", "head", "rank"),
                          np.repeat(ds[name].isel(site=[0]).values[:, :, :, None], heads_, axis=3))
    per_head = xr.Dataset(per_head, coords={"site": ["Heads@last"], "head": np.arange(heads_),
                                            "component": ("site", ["head"]), "positions": ("site", ["last"])})
    with_heads = ds.merge(heads.prefixed(per_head, heads.PREFIX))
    rows = explorer.with_heads_as_rows(with_heads)
    assert list(rows["site"].values) == [*ds["site"].values, "Heads@last 0", "Heads@last 1", "Heads@last 2"]
    assert list(rows["component"].values)[-3:] == ["head 0", "head 1", "head 2"]
    for h in range(3):
        np.testing.assert_array_equal(rows["js"].sel(site=f"Heads@last {h}").values, h)
    np.testing.assert_array_equal(rows["js"].isel(site=slice(0, ds.sizes["site"])).values, ds["js"].values)
    assert explorer.explorer_html(with_heads, pairs)  # the page draws


def test_a_paper_sized_page_stays_under_10_mb():
    ds, pairs = paper_sized_run()  # 1,209 examples x 3 sites x 32 layers, top 5 tokens of a 32,000-token vocabulary
    assert len(explorer.explorer_html(ds, pairs).encode()) < 10e6


def test_a_run_without_top_tokens_says_so_where_they_would_be():
    ds, pairs = small_run()
    page = explorer.explorer_html(without_top_tokens(ds), pairs)
    assert f'<p id="top-notice" class="notice">{html.escape(explorer.NO_TOP_TOKENS)}</p>' in page
    assert page_arrays(page)[0]["tokens"] is None


def test_a_run_of_one_example_says_so():
    ds, pairs = small_run()
    notice = "this run has one example: each cell's mean is that example's value, with no interval"
    assert html.escape(notice) in explorer.explorer_html(ds.isel(example=[0]), pairs.isel(example=[0]))
    assert html.escape(notice) not in explorer.explorer_html(ds, pairs)


def test_a_site_without_finite_values_says_so():
    ds, pairs = small_run()
    for name in ("js", "kl_patched_target", "kl_target_patched"):
        ds[name].loc[{"site": "Attn."}] = np.nan
    ds["js"].loc[{"site": "Last.", "layer": 2, "example": ds["example"][0]}] = np.inf
    assert explorer.notices(ds) == [
        "site 'Attn.' has no finite values of js, kl_patched_target, kl_target_patched: its row is empty",
        "not finite (NaN or infinite): 1 of 64 values of js; means and n leave them out"]
    page = explorer.explorer_html(ds, pairs)
    assert html.escape("site 'Attn.' has no finite values of js") in page


def token_without_text(ds):
    return ds.drop_sel(token_id=int(ds["top_token"].values[0, 0, 0, 1]))


def probs_rising(ds):
    ds = ds.copy(deep=True)
    ds["top_prob"].values[0, 0, 0] = np.sort(ds["top_prob"].values[0, 0, 0])  # least likely first
    return ds


@pytest.mark.parametrize("change, message", [
    (lambda ds, pairs: (ds.drop_vars("token_text"), pairs),
     "divergence.nc holds top_token, top_prob, target_top_token, target_top_prob but not token_text"),
    (lambda ds, pairs: (token_without_text(ds), pairs), "divergence.nc's token_text lacks the text of 1 token id(s): "),
    (lambda ds, pairs: (probs_rising(ds), pairs), "divergence.nc's top_prob is not probabilities from most to least likely"),
    (lambda ds, pairs: (ds.drop_vars("js"), pairs), "divergence.nc lacks js: is it a patchmap divergence.nc?"),
    (lambda ds, pairs: (ds, pairs.isel(example=slice(1, None))),
     "pairs.nc's examples are not divergence.nc's: are they of the same run?"),
    (lambda ds, pairs: (ds.isel(example=[]), pairs.isel(example=[])),
     "divergence.nc holds no numbers (0 examples, 3 sites, 4 layers)"),
])
def test_input_it_cannot_draw_is_one_clear_error_and_leaves_no_file(tmp_path, change, message):
    ds, pairs = change(*small_run())
    ds.to_netcdf(tmp_path / "divergence.nc")
    pairs.to_netcdf(tmp_path / "pairs.nc")
    with pytest.raises(UserError) as error:
        explorer.write_explorer(tmp_path / "divergence.nc", tmp_path / "pairs.nc", tmp_path / "explorer.html")
    assert str(error.value).startswith(f"cannot draw the explorer of {tmp_path / 'divergence.nc'}: {message}")
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["divergence.nc", "pairs.nc"]


# ---- a finished tiny run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir, snakemake's output) of the tiny workflow run to the end."""
    workdir = tmp_path_factory.mktemp("explorer")
    write_config(workdir, TINY)
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, result.stdout + result.stderr


def test_the_workflow_writes_the_explorer_and_says_where_to_look(finished):
    workdir, output = finished
    assert (workdir / "results" / "tiny" / "explorer.html").stat().st_size > 0
    assert ("patchmap run 'tiny':\n"
            "  heatmap   results/tiny/heatmap.png\n"
            "  explorer  results/tiny/explorer.html  (open it in a web browser; it needs no server)\n"
            "  table     python -m patchmap.summary results/tiny/divergence.nc\n") in output


# ---- in Chromium


def browser_problem():
    """Why no headless Chromium can be driven here, or None."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def driver():
    skip_unless_required(browser_problem(), "PATCHMAP_REQUIRE_BROWSER")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    profile = tempfile.mkdtemp(prefix="patchmap-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, path):
    """Open a page and wait until it is interactive; fails with the page's own message if it cannot start."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, READY_SECONDS).until(lambda d: d.execute_script(
        "return window.explorerReady || document.getElementById('status').className === 'notice'"))
    status = driver.execute_script("return window.explorerReady ? '' : document.getElementById('status').textContent")
    assert not status, status


def console_errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def heatmap_z(driver):
    return np.array(driver.execute_script("return document.getElementById('heatmap').data[0].z"), dtype=float)


def wait_for_z(driver, expected):
    """The heatmap's drawn values, once they equal `expected` (site x layer; NaN = empty cell)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def drawn(d):
        z = heatmap_z(d)
        return z.shape == expected.shape and np.allclose(z, expected, rtol=1e-12, atol=0, equal_nan=True)

    try:
        WebDriverWait(driver, 10).until(drawn)
    except Exception:
        pytest.fail(f"the heatmap shows {heatmap_z(driver).tolist()}, expected {expected.tolist()}")


def cell_point(driver, site, layer):
    """The page coordinates of a heatmap cell's centre."""
    return driver.execute_script("""
        const gd = document.getElementById('heatmap'), box = gd.getBoundingClientRect(), f = gd._fullLayout;
        return [box.left + f.xaxis._offset + f.xaxis.l2p(arguments[1]),
                box.top + f.yaxis._offset + f.yaxis.l2p(arguments[0])];""", site, layer)


def pointer(driver, site, layer, click):
    """Move the mouse onto a heatmap cell (and click it), as a user does."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    x, y = cell_point(driver, site, layer)
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(x), int(y))
    if click:
        actions.pointer_action.click()
    actions.perform()
    ActionChains(driver).pause(0.2).perform()


def listed(driver):
    """The example list: (example id, data-value, shown value) of each row, in order."""
    return driver.execute_script("""return [...document.querySelectorAll('#example-table tbody tr')].map(
        (r) => [r.dataset.example, r.dataset.value, r.querySelector('td.value').textContent])""")


def expected_rows(ds, metric, site, layer, examples=None):
    """A cell's examples as the page lists them: by value, highest first, ties in example order."""
    values = ds[metric].sel(site=site).isel(layer=layer).values
    order = [e for e in np.lexsort((np.arange(len(values)), -values.astype(np.float64)))
             if examples is None or e in examples]
    return [(str(ds["example"].values[e]), float(values[e])) for e in order]


def check_listing(driver, ds, metric, site, layer, examples=None):
    rows = listed(driver)
    expected = expected_rows(ds, metric, site, layer, examples)
    assert [r[0] for r in rows] == [e for e, _ in expected]
    assert [float(r[1]) for r in rows] == [v for _, v in expected]  # the file's float32 values, exactly
    assert [r[2] for r in rows] == [driver.execute_script("return fmt(arguments[0])", v) for _, v in expected]


def select(driver, element_id, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def mean_over(ds, metric, examples):
    return ds[metric].isel(example=examples).astype("float64").mean("example").transpose("site", "layer").values


def test_the_page_in_chromium(finished, driver, tmp_path):
    workdir, _ = finished
    ds = xr.load_dataset(workdir / "results" / "tiny" / "divergence.nc")
    pairs = xr.load_dataset(workdir / "results" / "tiny" / "pairs.nc")
    open_page(driver, workdir / "results" / "tiny" / "explorer.html")
    from selenium.webdriver.common.by import By

    # the heatmap: one cell per site and layer, the file's mean JS
    assert heatmap_z(driver).shape == (ds.sizes["site"], ds.sizes["layer"]) == (3, 2)
    wait_for_z(driver, ds["js_mean"].transpose("site", "layer").values)
    ticks = driver.execute_script("return document.getElementById('heatmap')._fullLayout.yaxis.ticktext")
    assert ticks == list(ds["site"].values)
    # hovering a cell shows its mean, 95% interval (the file's bootstrap, for JS over every example) and n
    pointer(driver, 1, 0, click=False)
    hover = driver.find_element(By.CSS_SELECTOR, "#heatmap .hovertext").text
    cell = ds.sel(site="Attn.").isel(layer=0)
    fmt = lambda v: driver.execute_script("return fmt(arguments[0])", float(v))  # noqa: E731
    assert f"mean JS divergence: {fmt(cell['js_mean'])} bits" in hover
    assert f"95% interval {fmt(cell['js_ci_low'])} to {fmt(cell['js_ci_high'])} (bootstrap, divergence.nc)" in hover
    assert "n = 12 examples" in hover
    assert not driver.find_elements(By.ID, "top-notice")  # the engines stored the top tokens

    # a clicked cell lists its examples, sorted by JS, with the file's values; the line shows its site
    pointer(driver, 1, 1, click=True)
    check_listing(driver, ds, "js", "Attn.", 1)
    line = driver.execute_script("return document.getElementById('line').data[2].y")
    np.testing.assert_allclose(line, ds["js_mean"].sel(site="Attn.").values, rtol=1e-12)
    first = driver.find_element(By.CSS_SELECTOR, "#example-table tbody tr")
    e = int(np.flatnonzero(ds["example"].values == first.get_attribute("data-example"))[0])
    assert first.find_element(By.CSS_SELECTOR, "mark").text == str(pairs["target_subject"].sel(example=ds["example"][e]).values)
    p_cell = first.find_elements(By.CSS_SELECTOR, "td.num")[2].text
    p_unpatched = pairs["target_p_answer"].sel(example=ds["example"][e]).values
    assert p_cell == f"{fmt(p_unpatched)} → {fmt(ds['p_target_answer'].sel(site='Attn.').values[e, 1])}"

    # another metric: the heatmap shows its means, the list is sorted by it
    select(driver, "metric", "kl_patched_target")
    wait_for_z(driver, ds["kl_patched_target_mean"].transpose("site", "layer").values)
    check_listing(driver, ds, "kl_patched_target", "Attn.", 1)
    select(driver, "metric", "flip")
    wait_for_z(driver, ds["flip_mean"].transpose("site", "layer").values)

    # a relation filter: every mean is over that relation's examples, the list holds only them
    select(driver, "metric", "js")
    relation = sorted(set(ds["relation"].values))[0]
    chosen = np.flatnonzero(ds["relation"].values == relation)
    assert 0 < len(chosen) < ds.sizes["example"]
    select(driver, "relation", relation)
    wait_for_z(driver, mean_over(ds, "js", chosen))
    check_listing(driver, ds, "js", "Attn.", 1, set(chosen))
    assert driver.find_element(By.ID, "chosen").text == f"{len(chosen)} of 12 examples chosen"
    pointer(driver, 2, 0, click=True)  # clicks still work once the heatmap is redrawn
    check_listing(driver, ds, "js", "MLP rel.", 0, set(chosen))
    # and text: the examples holding a word, within the relation
    word = str(pairs["target_subject"].values[chosen[0]]).split()[0]
    text = driver.find_element(By.ID, "text")
    text.send_keys(word)
    fields = ("example", "relation", "target_prompt", "source_prompt", "target_attribute", "source_attribute")
    holding = [e for e in chosen if any(word.lower() in str(ds[f].values[e]).lower() for f in fields)]
    wait_for_z(driver, mean_over(ds, "js", holding))
    check_listing(driver, ds, "js", "MLP rel.", 0, set(holding))

    assert console_errors(driver) == []
    screenshot = tmp_path / "explorer.png"
    assert driver.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_top_tokens_in_chromium(finished, driver, tmp_path):
    """The tiny run's top tokens, as the engines stored them, row by row; and a page of a run made before
    they were stored says so where they would be."""
    workdir, _ = finished
    run = workdir / "results" / "tiny"
    pairs = xr.load_dataset(run / "pairs.nc")
    ds = xr.load_dataset(run / "divergence.nc")
    from selenium.webdriver.common.by import By

    (tmp_path / "before.html").write_text(explorer.explorer_html(without_top_tokens(ds), pairs))
    open_page(driver, tmp_path / "before.html")
    assert driver.find_element(By.ID, "top-notice").text == explorer.NO_TOP_TOKENS
    open_page(driver, run / "explorer.html")
    assert not driver.find_elements(By.ID, "top-notice")
    pointer(driver, 0, 1, click=True)
    check_listing(driver, ds, "js", "Subj.", 1)
    texts = dict(zip(ds["token_id"].values.tolist(), ds["token_text"].values))
    rows = driver.find_elements(By.CSS_SELECTOR, "#example-table tbody tr")
    for row in rows:
        e = int(np.flatnonzero(ds["example"].values == row.get_attribute("data-example"))[0])
        for css, ids, probs in (("td.patched", ds["top_token"].sel(site="Subj.").values[e, 1], ds["top_prob"].sel(site="Subj.").values[e, 1]),
                                ("td.unpatched", ds["target_top_token"].values[e], ds["target_top_prob"].values[e])):
            shown = row.find_elements(By.CSS_SELECTOR, f"{css} .top-token")
            assert [s.find_element(By.TAG_NAME, "code").get_attribute("textContent") for s in shown] == [texts[i] for i in ids]
            assert [float(s.get_attribute("data-p")) for s in shown] == probs.tolist()
        answers = row.find_elements(By.CSS_SELECTOR, ".answer code")
        assert [a.get_attribute("textContent") for a in answers] == [
            texts[int(pairs[f"{role}_answer"].sel(example=ds["example"][e]).values)] for role in ("target", "source")]
    assert console_errors(driver) == []
    assert driver.save_screenshot(str(tmp_path / "explorer-top-tokens.png"))


@pytest.mark.parametrize("case", ["one example", "a site without finite values"])
def test_input_it_cannot_show_as_usual_is_a_message_not_a_blank_page(finished, driver, tmp_path, case):
    workdir, _ = finished
    run = workdir / "results" / "tiny"
    ds, pairs = xr.load_dataset(run / "divergence.nc"), xr.load_dataset(run / "pairs.nc")
    if case == "one example":
        ds, pairs = ds.isel(example=[0]), pairs.isel(example=[0])
    else:
        for name in ("js", "kl_patched_target", "kl_target_patched", "p_target_answer", "p_source_answer"):
            ds[name].loc[{"site": "Attn."}] = np.nan
    (tmp_path / "explorer.html").write_text(explorer.explorer_html(ds, pairs))
    open_page(driver, tmp_path / "explorer.html")
    from selenium.webdriver.common.by import By

    shown = [n.text for n in driver.find_elements(By.CSS_SELECTOR, "#notices .notice")]
    assert shown == explorer.notices(ds) and shown
    expected = ds["js"].astype("float64").mean("example").transpose("site", "layer").values
    wait_for_z(driver, expected)
    pointer(driver, 0, 0, click=True)
    assert len(listed(driver)) == ds.sizes["example"]
    assert console_errors(driver) == []


@pytest.mark.parametrize("attrs", [{"intervention": "noise", "noise_scale": 3.0},
                                   {"intervention": "ablate", "ablation_value": "mean", "window": 3},
                                   {"intervention": "knockout", "window": 1}], ids=lambda a: a["intervention"])
def test_without_a_source_prompt_the_list_says_what_takes_its_place(finished, driver, tmp_path, attrs):
    """The tiny swap run's numbers, labelled as another intervention's: the source column and its header."""
    workdir, _ = finished
    run = workdir / "results" / "tiny"
    ds, pairs = xr.load_dataset(run / "divergence.nc"), xr.load_dataset(run / "pairs.nc")
    ds.attrs.update(attrs)
    if attrs["intervention"] == "noise":  # seeds beyond JavaScript's exact integers (2**53)
        pairs["noise_seed"] = ("example", 2**62 - np.arange(ds.sizes["example"], dtype=np.int64))
        pairs.attrs["noise_std"] = 0.25
    (tmp_path / "explorer.html").write_text(explorer.explorer_html(ds, pairs))
    open_page(driver, tmp_path / "explorer.html")
    from selenium.webdriver.common.by import By

    pointer(driver, 0, 0, click=True)
    heads = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "#example-table th")]
    assert heads[3] == "source"
    assert heads[6].replace("\n", " ") == ("p(target answer) clean → patched" if attrs["intervention"] == "noise"
                                           else "p(target answer) unpatched → patched")
    note = explorer.source_note(ds, pairs)
    for row in driver.find_elements(By.CSS_SELECTOR, "#example-table tbody tr"):
        seed = pairs["noise_seed"].sel(example=row.get_attribute("data-example")).values if "noise_seed" in pairs else None
        expected = note + (f"; noise seed {int(seed)}" if seed is not None else "")
        assert row.find_elements(By.TAG_NAME, "td")[3].text == expected
    assert console_errors(driver) == []

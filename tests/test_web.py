"""The page at ``/`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium, against one real ``wanlite serve`` process
(``random:tiny``, ``--api-key``, ``--previews 1``) for the whole module.

The tests run in file order and share one browser tab (the key is typed once, as a user would):
the key prompt; the form built from ``json_request_schema`` (labels, keyboard order); the field
error for height 481 (the page's own, then the server's 400); a small generation with progress,
a live preview and a result that plays; cancelling a queued job (and the running one); the
history after a reload, from another host name of the same server.

Screenshots of each state are PNG artifacts in ``$WANLITE_ARTIFACTS/web`` (or pytest's tmp dir);
``WANLITE_WEB_SCREENSHOT=PATH`` also copies the running-and-queued one to PATH (the README's).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_server import CLEAN_EXIT, KEY, MODEL, Server  # noqa: I001 - test_server.py's helper

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from wanlite.params import json_schema  # noqa: E402

FPS = 16
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 8}
LONG = {"height": 256, "width": 256, "num_frames": 33, "num_inference_steps": 100}  # ~50 s


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _find("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = _find("chromedriver") or (
    "/usr/lib/chromium/chromedriver" if Path("/usr/lib/chromium/chromedriver").exists() else None
)
if CHROMIUM is None or CHROMEDRIVER is None:
    missing = " and ".join(
        n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None
    )
    pytest.skip(
        f"{missing} not found (apt-get install chromium chromium-driver)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("WANLITE_ARTIFACTS")
    out = Path(root) / "web" if root else tmp_path_factory.mktemp("web-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("web") / "data", extra=("--previews", "1"))
    s.start().wait_ready()
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)  # no driver download
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(driver, predicate, timeout: float = 60, what: str = "condition"):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d))
    except TimeoutException:
        logs = "\n".join(str(e) for e in driver.get_log("browser"))
        pytest.fail(f"timed out waiting for {what}; browser log:\n{logs}")


def shot(driver, artifacts: Path, name: str) -> Path:
    driver.execute_script("document.activeElement && document.activeElement.blur()")
    path = artifacts / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    return path


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def dialog_open(driver) -> bool:
    return bool(js(driver, "return document.getElementById('key-dialog').open"))


def page_ready(driver) -> bool:
    return js(driver, "return document.body.dataset.ready === '1'")


def open_page(driver, url: str, key: str = KEY) -> None:
    """Load the page; type the key if it asks (a new tab or origin)."""
    driver.get(url)
    wait(driver, lambda d: page_ready(d) or dialog_open(d), what="the page or the key prompt")
    if dialog_open(driver):
        driver.find_element(By.ID, "api-key").send_keys(key, Keys.ENTER)
    wait(driver, page_ready, what="the page to load its data")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.stream") == "on")


def field(driver, name: str):
    return driver.find_element(By.CSS_SELECTOR, f"form#generate [name='{name}']")


def fill(driver, **values) -> None:
    for name, value in values.items():
        el = field(driver, name)
        el.clear()
        if value != "":
            el.send_keys(str(value))


def field_error(driver, name: str) -> str:
    return driver.find_element(By.ID, f"field-{name}-error").text


def job_ids(driver) -> list[str]:
    return js(driver, "return [...document.querySelectorAll('.job')].map(l => l.dataset.id)")


def job(driver, gen_id: str):
    return driver.find_element(By.ID, f"job-{gen_id}")


def job_status(driver, gen_id: str) -> str | None:
    script = "const l = document.getElementById(arguments[0]); return l && l.dataset.status"
    return js(driver, script, f"job-{gen_id}")


def submit_new_job(driver, **values) -> str:
    """Fill the form, click Generate, return the id of the job that appears."""
    before = set(job_ids(driver))
    fill(driver, **values)
    driver.find_element(By.ID, "submit").click()
    new = wait(driver, lambda d: set(job_ids(d)) - before, 30, "the new job in the list")
    assert len(new) == 1, new
    return new.pop()


def refused_posts(server: Server) -> list[dict]:
    """The access-log lines of ``POST /api/ai/queue`` answered with a 400."""
    return [
        r
        for r in server.log_records()
        if r.get("msg") == "request" and r.get("path") == "/api/ai/queue" and r.get("status") == 400
    ]


def queue_count(server: Server) -> int:
    return server.req("GET", "/api/ai/queue?status=all").json()["count"]


# -- the tests, in order ---------------------------------------------------------------------


def test_key_prompt_once_per_tab(server, browser, artifacts):
    # the page itself is open and carries no secret; the API is not
    for path in ("/", "/static/app.js", "/static/style.css"):
        r = server.req("GET", path, auth=False)
        assert r.status_code == 200, (path, r.text)
        assert KEY not in r.text
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert server.req("GET", "/api/ai/models", auth=False).status_code == 401

    browser.get(server.base + "/")
    wait(browser, dialog_open, 30, "the key prompt")
    assert js(browser, "return document.activeElement.id") == "api-key"  # keyboard-ready
    label = browser.find_element(By.CSS_SELECTOR, "label[for='api-key']").text
    assert label == "API key"
    shot(browser, artifacts, "1-key-prompt")

    browser.find_element(By.ID, "api-key").send_keys("wrong-key", Keys.ENTER)
    wait(browser, lambda d: "refused" in d.find_element(By.ID, "key-error").text, 30)
    assert dialog_open(browser) and not page_ready(browser)
    shot(browser, artifacts, "2-key-refused")

    browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
    wait(browser, page_ready, 30, "the page after the right key")
    assert not dialog_open(browser)
    assert js(browser, "return sessionStorage.getItem('wanlite.apiKey')") == KEY
    assert js(browser, "return localStorage.length") == 0 and browser.get_cookies() == []

    browser.refresh()  # the same tab: no second prompt
    wait(browser, page_ready, 30, "the reloaded page")
    assert not dialog_open(browser)

    first = browser.current_window_handle
    browser.switch_to.new_window("tab")  # another tab has its own sessionStorage: asked again
    browser.get(server.base + "/")
    wait(browser, dialog_open, 30, "the key prompt in a new tab")
    browser.close()
    browser.switch_to.window(first)


def test_form_is_built_from_the_schema(server, browser):
    open_page(browser, server.base + "/")
    schema = json_schema()
    form = browser.find_element(By.ID, "generate")
    names = js(browser, "return [...arguments[0].elements].map(e => e.name).filter(Boolean)", form)
    assert names == list(schema["properties"])  # every field, nothing else, schema order
    for name, prop in schema["properties"].items():
        el = field(browser, name)
        label = browser.find_element(By.CSS_SELECTOR, f"label[for='{el.get_attribute('id')}']")
        assert label.text.strip(), name
        if "string" in prop["type"]:
            assert el.tag_name == "textarea", name
        else:
            assert el.get_attribute("type") == "number", name
            assert el.get_attribute("min") == str(prop["minimum"]), name
            if prop["maximum"] < 2**53:
                assert el.get_attribute("max") == str(prop["maximum"]), name
        default = prop.get("default")
        value = el.get_attribute("value")
        assert value == ("" if default is None else str(default).removesuffix(".0")), name
    assert field(browser, "prompt").get_attribute("required") == "true"

    # every control has a name a screen reader can say
    unlabelled = js(
        browser,
        """return [...document.querySelectorAll('input, textarea, button, video, select')]
             .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                          && !e.textContent.trim() && e.offsetParent !== null)
             .map(e => e.outerHTML.slice(0, 80));""",
    )
    assert unlabelled == []

    # the keyboard walks the form in order, ending on Generate
    field(browser, "prompt").click()
    order = [js(browser, "return document.activeElement.name")]
    for _ in names[1:]:
        browser.switch_to.active_element.send_keys(Keys.TAB)
        order.append(js(browser, "return document.activeElement.name"))
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert order == names
    assert js(browser, "return document.activeElement.id") == "submit"


def test_height_481_is_shown_next_to_the_field(server, browser, artifacts):
    open_page(browser, server.base + "/")
    fill(browser, prompt="a red fox", **SMALL)
    fill(browser, height=481)
    expected = "height must be an integer in [1, 480], got 481"
    assert field_error(browser, "height") == expected  # while typing, before any submit
    assert field(browser, "height").get_attribute("aria-invalid") == "true"
    n = queue_count(server)
    browser.find_element(By.ID, "submit").click()
    assert js(browser, "return document.activeElement.name") == "height"
    time.sleep(0.3)
    assert queue_count(server) == n  # nothing was sent
    shot(browser, artifacts, "3-field-error")

    # the server's own 400, shown next to the field it names (the page's checks bypassed)
    refused = len(refused_posts(server))
    body = {"model": MODEL, "prompt": "x", "height": 481}
    direct = server.req("POST", "/api/ai/queue", json=body)
    assert direct.status_code == 400 and direct.json()["error"]["param"] == "height"
    js(browser, "document.getElementById('field-height-error').textContent = ''")
    js(browser, "window.wanlite.submit({validate: false})")
    wait(browser, lambda d: field_error(d, "height") == direct.json()["error"]["message"], 30)
    el = browser.find_element(By.ID, "field-height-error")
    assert el.get_attribute("data-source") == "server"
    deadline = time.monotonic() + 5  # the access log is written once the response is sent
    while len(refused_posts(server)) < refused + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(refused_posts(server)) == refused + 2  # ours, and the page's request
    assert queue_count(server) == n

    fill(browser, height=SMALL["height"])
    assert field_error(browser, "height") == ""


RECORDER = """
window.__seen = [];
const list = document.getElementById('job-list');
const note = () => {
  for (const li of list.children) {
    const img = li.querySelector('.job-preview');
    window.__seen.push({id: li.dataset.id, status: li.dataset.status, step: li.dataset.step,
                        bar: li.querySelector('.job-bar').value,
                        preview: img.hidden ? null : img.src.slice(0, 23)});
  }
};
new MutationObserver(note).observe(list, {subtree: true, childList: true, attributes: true});
"""


def test_generate_shows_progress_preview_and_plays(server, browser, artifacts):
    open_page(browser, server.base + "/")
    js(browser, RECORDER)  # what the list showed, state by state
    gen_id = submit_new_job(browser, prompt="a red fox in the snow", seed="", **SMALL)
    wait(browser, lambda d: job_status(d, gen_id) == "succeeded", 120, "the job to succeed")
    seen = [s for s in js(browser, "return window.__seen") if s["id"] == gen_id]
    running = [s for s in seen if s["status"] == "processing"]
    total = SMALL["num_inference_steps"]
    middle = [s for s in running if 0 < int(s["step"]) < total and s["bar"] == int(s["step"])]
    assert middle, seen  # progress from the stream, before the end
    assert any(s["preview"] == "data:image/jpeg;base64," for s in middle), seen  # live preview

    api = server.status(gen_id)
    assert api["status"] == "succeeded"
    assert {k: api[k] for k in SMALL} == SMALL
    li = job(browser, gen_id)
    assert li.find_element(By.CLASS_NAME, "job-seed").text == f"Seed {api['seed']}"

    # the result plays: H.264 decoded by the browser, duration = frames / 16 fps
    video = li.find_element(By.TAG_NAME, "video")
    wait(browser, lambda d: js(d, "return arguments[0].readyState", video) >= 1, 30, "metadata")
    duration = js(browser, "return arguments[0].duration", video)
    assert abs(duration - SMALL["num_frames"] / FPS) < 0.5 / FPS, duration
    played = browser.execute_async_script(
        """const [v, done] = arguments;
           v.play().then(() => v.requestVideoFrameCallback(() => done(
               {w: v.videoWidth, h: v.videoHeight, t: v.currentTime, err: v.error})),
             e => done({err: String(e)}));""",
        video,
    )
    assert played["err"] is None and (played["w"], played["h"]) == (32, 32), played
    wait(browser, lambda d: js(d, "return arguments[0].currentTime > 0", video), 10, "playback")
    src = video.get_attribute("src")
    assert src.startswith(server.base + f"/api/ai/results/{gen_id}.mp4?"), src  # signed link

    link = li.find_element(By.CLASS_NAME, "job-download")
    assert link.get_attribute("download") == f"{gen_id}.mp4"
    r = requests.get(link.get_attribute("href"), timeout=30)  # no key needed: the link is signed
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    js(browser, "arguments[0].pause(); arguments[0].currentTime = 0.1", video)
    js(browser, "arguments[0].scrollIntoView()", li)
    shot(browser, artifacts, "4-result")

    # "reuse seed" puts the result's seed in the form (by keyboard)
    reuse = li.find_element(By.CLASS_NAME, "job-reuse")
    js(browser, "arguments[0].focus()", reuse)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    assert field(browser, "seed").get_attribute("value") == str(api["seed"])
    assert js(browser, "return document.activeElement.name") == "seed"
    fill(browser, seed="")


def test_cancel_a_queued_job(server, browser, artifacts):
    open_page(browser, server.base + "/")
    running = submit_new_job(browser, prompt="a long one", **LONG)
    wait(
        browser,
        lambda d: js(d, "return !arguments[0].querySelector('img').hidden", job(d, running)),
        120,
        "the running job's preview",
    )
    queued = submit_new_job(browser, prompt="a queued one", **SMALL)
    assert job_status(browser, queued) == "queued" and job_status(browser, running) == "processing"
    js(browser, "window.scrollTo(0, 0)")
    path = shot(browser, artifacts, "5-running-and-queued")
    if os.environ.get("WANLITE_WEB_SCREENSHOT"):  # the README's picture
        shutil.copyfile(path, os.environ["WANLITE_WEB_SCREENSHOT"])

    job(browser, queued).find_element(By.CLASS_NAME, "job-cancel").click()
    wait(browser, lambda d: job_status(d, queued) == "cancelled", 30, "the queued job cancelled")
    api = server.status(queued)
    assert api["status"] == "cancelled" and api["started_at"] is None  # it never ran
    assert not job(browser, queued).find_element(By.CLASS_NAME, "job-cancel").is_displayed()
    shot(browser, artifacts, "6-queued-cancelled")

    job(browser, running).find_element(By.CLASS_NAME, "job-cancel").click()  # the running one
    wait(browser, lambda d: job_status(d, running) == "cancelled", 60, "the running job cancelled")
    assert server.status(running)["status"] == "cancelled"


def test_history_after_a_reload_from_another_host_name(server, browser, artifacts):
    # localhost is another origin than 127.0.0.1 (its own sessionStorage: the key is asked for),
    # served by the same server: the Host and Origin checks let the page's own requests through
    url = f"http://localhost:{server.port}/"
    open_page(browser, url)
    if not any(g["status"] == "succeeded" for g in server.all_generations()):  # run alone
        server.wait(server.enqueue(**SMALL)[0])
    gens = server.all_generations()
    shown = job_ids(browser)
    assert shown == [g["generation_id"] for g in reversed(gens)]  # newest first, all of them
    for g in gens:
        assert job_status(browser, g["generation_id"]) == g["status"]
    done = next(g for g in gens if g["status"] == "succeeded")
    video = job(browser, done["generation_id"]).find_element(By.TAG_NAME, "video")
    assert video.get_attribute("src").startswith(url)  # same origin as the page
    wait(browser, lambda d: js(d, "return arguments[0].readyState", video) >= 2, 30, "a frame")
    duration = js(browser, "return arguments[0].duration", video)
    assert abs(duration - done["num_frames"] / FPS) < 0.5 / FPS
    fill(browser, prompt="a red fox in the snow, at dusk", **SMALL)
    js(browser, "window.scrollTo(0, 0)")
    shot(browser, artifacts, "7-history")


# -- a causal model: the video plays while it is made (issue 24) ------------------------------
LIVE = {"height": 128, "width": 128, "num_frames": 120}  # 11 chunks, ~1 s each here: ~12 s


@pytest.fixture(scope="module")
def causal_server(tiny_checkpoint, tmp_path_factory):
    from wanlite.weights.random_checkpoint import write_causal_file

    folder = tmp_path_factory.mktemp("web-causal")
    causal = write_causal_file(tiny_checkpoint, folder / "self_forcing.pt")
    s = Server(folder / "data", extra=("--transformer", str(causal)))
    s.start().wait_ready()
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


def test_a_causal_job_plays_while_it_is_made(causal_server, browser, artifacts):
    """MediaSource on the growing fragmented MP4 in real headless Chromium: the live <video>
    shows frames (currentTime > 0, decoded frames > 0) while the job is still running; then
    the finished result replaces it and plays whole."""
    server = causal_server
    model = server.req("GET", f"/api/ai/models/{MODEL}").json()
    assert model["streaming"] is True
    open_page(browser, server.base + "/")
    gen_id = submit_new_job(browser, prompt="a fox that streams", seed="3", **LIVE)
    li = job(browser, gen_id)
    video = li.find_element(By.CLASS_NAME, "job-live")
    probe = """const [v, li] = arguments;
        const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : {};
        return {t: v.currentTime, frames: q.totalVideoFrames || 0, status: li.dataset.status,
                live: li.dataset.live || null, hidden: v.hidden, err: v.error && v.error.code,
                buffered: v.buffered.length ? v.buffered.end(0) : 0,
                step: li.querySelector('.job-step').textContent};"""
    shown = wait(
        browser,
        lambda d: (s := js(d, probe, video, li))["t"] > 0 and s["frames"] > 0 and s,
        90,
        "the live video to play",
    )
    api = server.status(gen_id)  # asked after the browser played frames: still running
    assert shown["status"] == "processing" and api["status"] == "processing", (shown, api)
    assert api["progress"]["step"] < api["progress"]["total"], api
    assert shown["live"] == "playing" and not shown["hidden"] and shown["err"] is None, shown
    assert shown["buffered"] < LIVE["num_frames"] / FPS  # only part of the video exists yet
    assert shown["step"].endswith(f" of {LIVE['num_frames']} frames"), shown  # frames made
    assert api["stream_url"] and ".stream.mp4?" in api["stream_url"]  # signed like results
    shot(browser, artifacts, "8-live")
    wait(browser, lambda d: job_status(d, gen_id) == "succeeded", 120, "the job to succeed")
    wait(browser, lambda d: js(d, "return arguments[0].hidden", video), 10, "the live video gone")
    result = li.find_element(By.CLASS_NAME, "job-video")
    wait(browser, lambda d: js(d, "return arguments[0].readyState", result) >= 1, 30, "metadata")
    duration = js(browser, "return arguments[0].duration", result)
    assert abs(duration - LIVE["num_frames"] / FPS) < 0.5 / FPS, duration

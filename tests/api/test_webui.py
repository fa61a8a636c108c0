"""The chat page at / in a real headless Chromium, driven by Selenium as a person would use it: typing,
Enter, the Stop button, the model picker, the key prompt, a reload.

One test streams real tokens from the default model; the rest run over scripted engines (ReplyEngine) that
answer with fixed text at a known pace: a long reply to stop, markup that must show as text, a name per model.
Needs Debian's chromium and chromium-driver (.ci/run installs them) and selenium (the test extra).
"""
from __future__ import annotations

import json
import re
import shutil
import threading
from concurrent.futures import Future

import httpx
import pytest
from api_helpers import API_KEY, ScriptedEngine, ServerThread, scrape, wait_until

from tokenmill.api.models import ModelRegistry
from tokenmill.api.server import build_app
from tokenmill.engine.core.async_engine import AsyncLLMEngine
from tokenmill.engine.core.llm_engine import EngineStats
from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("the chat page's browser tests need Debian's `chromium` and `chromium-driver` packages "
                "(apt-get install chromium chromium-driver; .ci/run installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="the chat page's browser tests need selenium "
                                "(pip install 'tokenmill[test]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

DESKTOP, PHONE = (1280, 800), (390, 844)
XSS = ('Careful: <script>window.__pwned=1</script> and <img src=x onerror="window.__pwned=1"> and '
       '[a link](javascript:window.__pwned=1)\n```html\n<script>window.__pwned=1</script>\n```')
LONG = "and on " * 3000


class ReplyEngine(ScriptedEngine):
    """A scripted engine with a real tokenizer (for the chat template) that answers each chat with
    reply(the last user message), a few characters a step, one token each."""

    def __init__(self, tokenizer, reply, max_num_seqs: int = 4, max_waiting_seqs: int = 4):
        super().__init__(max_num_seqs, max_waiting_seqs)
        self.tokenizer, self.reply = tokenizer, reply
        self.model_config.vocab_size = len(tokenizer)
        self.max_model_len = 4096
        self.params = []  # each request's SamplingParams, as the engine got them

    def get_tokenizer(self):
        return self.tokenizer

    def stats(self) -> EngineStats:
        return EngineStats(len(self.requests), 0, 0.0, 0, 0, 0, 0, 0)

    def compile_grammar(self, params) -> Future:
        done = Future()  # nothing to compile: the reply is fixed
        done.set_result(None)
        return done

    def add_request(self, request_id, prompt, params, arrival_time=None, lora_name=None):
        self.params.append(params)
        asked = self.tokenizer.decode(prompt).rsplit("<|im_start|>user", 1)[-1]
        self.requests[request_id] = [self.reply(asked), params.max_tokens or 10 ** 6, 0]

    def step(self):
        if self.fail_step.is_set():
            raise RuntimeError("device lost")
        outs = []
        for rid, state in list(self.requests.items()):
            piece, state[0] = state[0][:4], state[0][4:]
            state[2] += 1
            done = not state[0] or state[2] >= state[1]
            if done:
                del self.requests[rid]
            finish = None if not done else "stop" if not state[0] else "length"
            outs.append(RequestOutput(rid, None, [1], [CompletionOutput(0, piece, [7], None, None, finish)],
                                      done, RequestMetrics(0.0)))
        threading.Event().wait(self.step_s)
        return outs


def scripted(name: str):
    return lambda asked: XSS if "xss" in asked else LONG if "long" in asked else f"Hello from **{name}**."


def fake_server(tokenizer, models: dict[str, ReplyEngine], api_key: str | None = None) -> ServerThread:
    """An app over the engines, served as NAME or NAME:VERSION in order."""
    registry = ModelRegistry()
    for model_id, engine in models.items():
        name, _, version = model_id.partition(":")
        registry.add(AsyncLLMEngine(engine), name, version or None)
    return ServerThread(build_app(registry, api_key=api_key))


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.engine.get_tokenizer()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={DESKTOP[0]},{DESKTOP[1] + 200}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for script errors
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def viewport(driver, size: tuple[int, int]) -> None:
    """The page's viewport exactly this size in CSS pixels (the window's size would include the browser's frame),
    as a phone's below 700 wide; then until the layout's transitions have run."""
    width, height = size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700})
    WebDriverWait(driver, 5, 0.05).until(lambda _: driver.execute_script(
        "return window.innerWidth === arguments[0] && document.getAnimations().length === 0", width))


class Page:
    """The chat page in the browser, opened afresh (nothing stored) at a server's root."""

    def __init__(self, driver, url: str):
        self.driver = driver
        driver.get_log("browser")  # the console from here on only
        driver.get(url)
        viewport(driver, DESKTOP)
        driver.execute_script("localStorage.clear(); sessionStorage.clear();")
        driver.refresh()
        self.wait = WebDriverWait(driver, 30, poll_frequency=0.05)

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def models(self) -> list[str]:
        self.wait.until(lambda _: self.js("return document.querySelectorAll('#model option').length"))
        return [o.get_attribute("value") for o in Select(self.find("#model")).options]

    def settings(self, **values: str) -> None:
        if not self.find("#settings").get_attribute("open"):
            self.find("#settings summary").click()
        for field, value in values.items():
            box = self.find(f"#{field}")
            box.clear()
            box.send_keys(value)

    def send(self, text: str) -> None:
        self.find("#input").send_keys(text, Keys.ENTER)

    def replies(self) -> list[str]:
        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")]

    def streaming(self) -> bool:
        return self.find("#stop").is_displayed()

    def wait_done(self, timeout: float = 60) -> None:
        """Until the last reply has ended: Stop gone and Send back."""
        WebDriverWait(self.driver, timeout, 0.05).until(
            lambda _: self.js("return document.querySelectorAll('.msg.assistant').length > 0 "
                              "&& document.getElementById('stop').hidden && !document.getElementById('send').hidden"))

    def last(self, css: str) -> str:
        found = self.driver.find_elements(By.CSS_SELECTOR, f".msg.assistant:last-child {css}")
        return found[0].text if found else ""

    def record_stream(self) -> None:
        """From now on, note the last reply's length and whether Stop shows at every change of the messages."""
        self.js("""window.__seen = [];
                   new MutationObserver(() => {
                     const r = [...document.querySelectorAll('.msg.assistant .content')].pop();
                     window.__seen.push([r ? r.textContent.length : 0, !document.getElementById('stop').hidden]);
                   }).observe(document.getElementById('messages'), {subtree: true, childList: true,
                                                                    characterData: true});""")

    def screenshot(self, path, size) -> None:
        viewport(self.driver, size)
        self.driver.save_screenshot(str(path))
        viewport(self.driver, DESKTOP)


def test_real_tokens_stream_in_and_the_conversation_survives_a_reload(browser, server, model_name, tmp_path):
    page = Page(browser, server.url)
    assert page.models() == [model_name]
    page.settings(max_tokens="48", temperature="0")
    page.record_stream()
    page.send("Write a short poem about the sea.")
    page.wait_done()
    reply = page.replies()[-1]
    assert reply.strip() and page.last(".error") == ""
    seen = page.js("return window.__seen")
    # Text arrived in several pieces while the reply was still going (Stop showing), before it ended.
    assert len({n for n, going in seen if going and n > 0}) >= 2, seen
    stats = page.last(".stats")
    assert re.fullmatch(rf"{re.escape(model_name)} · TTFT \d+ ms · [\d.]+ tok/s · \d+ tokens", stats), stats

    page.screenshot(tmp_path / "desktop.png", DESKTOP)
    page.screenshot(tmp_path / "phone.png", PHONE)
    for name in ("desktop.png", "phone.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    browser.refresh()
    page.wait.until(lambda _: page.replies())
    assert page.replies() == [reply]
    assert page.find("#conversations li.current .title").text == "Write a short poem about the sea."
    page.find("#new-chat").click()
    assert page.replies() == [] and len(browser.find_elements(By.CSS_SELECTOR, "#conversations li")) == 1
    page.find("#conversations .delete").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#conversations li") == []
    browser.refresh()
    assert page.js("return JSON.parse(localStorage.getItem('tokenmill.conversations'))") == []


@pytest.fixture(scope="module")
def two_models(tokenizer):
    engines = {"alpha": ReplyEngine(tokenizer, scripted("alpha")), "beta:v2": ReplyEngine(tokenizer, scripted("beta"))}
    with fake_server(tokenizer, engines) as server:
        yield server, engines


def test_stop_aborts_the_request_on_the_server(browser, two_models):
    server, _ = two_models
    page = Page(browser, server.url)
    with httpx.Client(base_url=server.url) as http:
        page.send("a long one please")
        page.wait.until(lambda _: len(page.replies()[-1]) > 40)
        assert page.streaming() and scrape(http, "num_requests_running") == 1
        page.find("#stop").click()
        page.wait_done()
        assert wait_until(lambda: scrape(http, "num_requests_running") == 0, timeout=10)
    assert "stopped" in page.last(".stats") and page.last(".error") == ""
    stopped_at = page.replies()[-1]
    assert 40 < len(stopped_at) < len(LONG.strip())
    threading.Event().wait(0.3)
    assert page.replies()[-1] == stopped_at  # nothing more arrives

    page.send("long again")  # Escape stops too
    page.wait.until(lambda _: len(page.replies()[-1]) > 20)
    page.find("#input").send_keys(Keys.ESCAPE)
    page.wait_done()
    assert "stopped" in page.last(".stats")


def test_the_model_picker_switches_models_and_regenerate_and_edit_resend(browser, two_models):
    server, engines = two_models
    page = Page(browser, server.url)
    assert page.models() == ["alpha", "beta:v2"]
    page.send("hi")
    page.wait_done()
    assert page.replies() == ["Hello from alpha."] and "alpha" in page.last(".stats")
    assert page.find(".msg.assistant strong").text == "alpha"  # markdown applied
    Select(page.find("#model")).select_by_value("beta:v2")
    page.find(".msg.assistant .action").click()  # Regenerate: the last reply again, from beta now
    page.wait_done()
    assert page.replies() == ["Hello from beta."] and "beta:v2" in page.last(".stats")

    # Edit the last question: it comes back into the box, the turn goes, and Enter sends the edit.
    edit = [b for b in browser.find_elements(By.CSS_SELECTOR, ".msg.user .action") if b.text == "Edit"]
    edit[0].click()
    assert page.find("#input").get_attribute("value") == "hi" and page.replies() == []
    page.find("#input").send_keys(Keys.SHIFT, Keys.ENTER, Keys.NULL, "there", Keys.ENTER)
    page.wait_done()
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")][-1].startswith("hi\nthere")
    assert page.replies() == ["Hello from beta."]
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []  # no script error
    sent = engines["beta:v2"].params[-1]
    assert sent.max_tokens is None or sent.max_tokens > 100  # nothing set: the server's default


def test_model_output_never_runs_as_markup(browser, two_models):
    server, _ = two_models
    page = Page(browser, server.url)
    page.send("show me some xss")
    page.wait_done()
    assert page.js("return window.__pwned") is None
    reply = page.find(".msg.assistant .content")
    assert '<script>window.__pwned=1</script>' in reply.text
    assert '<img src=x onerror="window.__pwned=1">' in reply.text
    assert "[a link](javascript:window.__pwned=1)" in reply.text  # not a link: only http(s) become links
    assert reply.find_elements(By.CSS_SELECTOR, "script, img, a") == []
    assert reply.find_element(By.CSS_SELECTOR, "pre code").text == "<script>window.__pwned=1</script>"


def test_the_markdown_renderer_makes_only_its_own_elements(browser, two_models):
    server, _ = two_models
    Page(browser, server.url)
    cases = {
        "**bold** and *it* and `<b>code</b>`": "<p><strong>bold</strong> and <em>it</em> and "
                                                "<code>&lt;b&gt;code&lt;/b&gt;</code></p>",
        "[site](https://example.com/a?b=1&c=2)": '<p><a href="https://example.com/a?b=1&amp;c=2" target="_blank" '
                                                 'rel="noopener noreferrer">site</a></p>',
        "[x](data:text/html,<script>1</script>)": "<p>[x](data:text/html,&lt;script&gt;1&lt;/script&gt;)</p>",
        "# Title\n- one\n- <i>two</i>": "<h3>Title</h3><ul><li>one</li><li>&lt;i&gt;two&lt;/i&gt;</li></ul>",
        "> quote <svg onload=1>": "<blockquote><p>quote &lt;svg onload=1&gt;</p></blockquote>",
        "[**x**](https://a.b\" onmouseover=\"1)": "<p>[<strong>x</strong>](https://a.b\" onmouseover=\"1)</p>",
    }
    got = browser.execute_async_script("""
        const [cases, done] = arguments;
        import('/webui/markdown.js').then(({renderMarkdown}) => done(Object.fromEntries(Object.keys(cases).map(
          (text) => { const d = document.createElement('div'); d.append(renderMarkdown(text));
                      return [text, d.innerHTML]; }))));""", cases)
    assert got == cases


def test_errors_show_as_messages_and_never_freeze_the_page(browser, two_models, tokenizer):
    server, engines = two_models
    page = Page(browser, server.url)
    page.settings(max_tokens="-5")
    page.send("hi")
    page.wait_done()
    assert "Error 400" in page.last(".error") and "max_tokens" in page.last(".error")

    page.settings(max_tokens="", schema="{not json")
    page.send("hi")
    notice = page.find("#notice")
    assert notice.is_displayed() and "JSON schema: not valid JSON" in notice.text
    assert page.find("#input").get_attribute("value") == "hi"  # not sent: still there to fix
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    page.settings(schema=json.dumps(schema))
    page.find("#input").send_keys(Keys.ENTER)
    page.wait_done()
    assert not notice.is_displayed() and page.replies()[-1] == "Hello from alpha."
    assert engines["alpha"].params[-1].structured_outputs.json == schema

    # 503 with Retry-After: an engine with room for two requests (one running, one waiting), both taken.
    busy = ReplyEngine(tokenizer, scripted("busy"), max_num_seqs=1, max_waiting_seqs=1)
    with fake_server(tokenizer, {"busy": busy}) as busy_server, httpx.Client(base_url=busy_server.url) as http:
        page = Page(browser, busy_server.url)
        long_chat = {"messages": [{"role": "user", "content": "long"}], "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=long_chat) as first, \
                http.stream("POST", "/v1/chat/completions", json=long_chat) as second:
            assert first.status_code == second.status_code == 200
            page.send("hi")
            page.wait_done()
            assert "Server busy, retry in 1 s" in page.last(".error")
        # The engine dies mid-reply: the stream's error event shows, then new requests get a 503.
        page.send("a long story")
        page.wait.until(lambda _: len(page.replies()[-1]) > 20)
        busy.fail_step.set()
        page.wait_done()
        assert "engine died" in page.last(".error")
        page.send("anyone there?")
        page.wait_done()
        assert "Error 503" in page.last(".error")
        assert page.find("#send").is_enabled() and page.find("#input").is_enabled()


def test_the_key_prompt_with_api_key(browser, tokenizer):
    with fake_server(tokenizer, {"locked": ReplyEngine(tokenizer, scripted("locked"))}, api_key=API_KEY) as server:
        page = Page(browser, server.url)
        dialog = page.find("#key-dialog")
        page.wait.until(lambda _: dialog.is_displayed())
        assert "Incorrect or missing API key" in page.find("#key-error").text
        page.find("#key-input").send_keys("wrong-key", Keys.ENTER)
        page.wait.until(lambda _: dialog.is_displayed() and page.find("#key-error").text)
        assert "Incorrect or missing API key" in page.find("#key-error").text
        assert browser.find_elements(By.CSS_SELECTOR, "#model option") == []
        page.find("#key-input").clear()
        page.find("#key-input").send_keys(API_KEY, Keys.ENTER)
        assert page.models() == ["locked"] and not dialog.is_displayed()
        page.send("hi")
        page.wait_done()
        assert page.replies() == ["Hello from locked."]
        assert page.js("return sessionStorage.getItem('tokenmill.apiKey')") == API_KEY
        assert page.js("return localStorage.getItem('tokenmill.apiKey')") is None


def test_phone_width_and_keyboard_only(browser, two_models, tmp_path):
    server, _ = two_models
    page = Page(browser, server.url)
    page.send("hi")
    page.wait_done()
    viewport(browser, PHONE)
    try:
        toggle, sidebar = page.find("#toggle-sidebar"), page.find("#sidebar")
        assert toggle.is_displayed()
        assert page.js("return arguments[0].getBoundingClientRect().right", sidebar) <= 0  # off screen
        toggle.click()
        page.wait.until(lambda _: page.js("return document.getAnimations().length === 0 "
                                          "&& arguments[0].getBoundingClientRect().left >= 0", sidebar))
        browser.save_screenshot(str(tmp_path / "phone-sidebar.png"))
        page.find("#new-chat").click()
        assert page.js("return document.body.scrollWidth") <= PHONE[0]  # nothing wider than the screen
        # Keyboard alone: the focus lands in the message box, and Enter sends.
        assert page.js("return document.activeElement.id") == "input"
        browser.switch_to.active_element.send_keys("hello again", Keys.ENTER)
        page.wait_done()
        assert page.replies() == ["Hello from alpha."]
    finally:
        viewport(browser, DESKTOP)

"""The chat page's files over HTTP (no browser): served at / with a strict CSP, outside the OpenAPI schema and
the API key, and gone with --no-webui. The page itself is tried in a browser in test_webui.py."""
from __future__ import annotations

import httpx
from api_helpers import API_KEY, ScriptedEngine, ServerThread

from tokenmill.api.args import build_parser
from tokenmill.api.chat_page import WEBUI_DIR
from tokenmill.api.server import build_app
from tokenmill.engine.core.async_engine import AsyncLLMEngine


def test_the_page_and_its_files_load_without_the_key_under_a_strict_csp():
    with ServerThread(build_app(AsyncLLMEngine(ScriptedEngine()), api_key=API_KEY)) as server, \
            httpx.Client(base_url=server.url) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/webui/app.js">' in page.text
        csp = page.headers["content-security-policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "connect-src 'self'", "style-src 'self'"):
            assert directive in csp
        assert "unsafe-inline" not in csp and page.headers["x-content-type-options"] == "nosniff"
        for name in ("app.js", "api.js", "markdown.js", "store.js"):
            script = http.get(f"/webui/{name}")
            assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
            assert script.text == (WEBUI_DIR / name).read_text()
        assert http.get("/webui/style.css").headers["content-type"].startswith("text/css")
        # Only the shipped files, by name: nothing else of the filesystem.
        for path in ("/webui/nope.js", "/webui/..%2Fchat_page.py", "/webui/%2e%2e/server.py"):
            missing = http.get(path)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", path
        assert http.get("/v1/models").status_code == 401  # the key still guards the API
        assert "/" not in http.get("/openapi.json").json()["paths"]


def test_no_webui_leaves_slash_a_404_in_openai_format():
    assert build_parser().parse_args(["serve", "--no-webui"]).webui is False
    assert build_parser().parse_args(["serve"]).webui is True
    with ServerThread(build_app(AsyncLLMEngine(ScriptedEngine()), webui=False)) as server, \
            httpx.Client(base_url=server.url) as http:
        for path in ("/", "/webui/app.js"):
            r = http.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        assert http.get("/v1/models").status_code == 200

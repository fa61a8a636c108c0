"""monitoring/ against a real Prometheus: Debian's `prometheus` scrapes a live `tokenmill serve` under a
short load, and every PromQL expression of the Grafana dashboard and of the alerting rules returns data
through Prometheus' HTTP API; `promtool` accepts the rules and the example configuration.

Without the `prometheus` and `promtool` binaries (Debian's `prometheus` package; .ci/run installs it) the
tests skip, saying so.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from api_helpers import ServeProcess, free_port, wait_until

from tokenmill.engine.config import default_model_path

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "alerts.yml"
MODEL, VERSION = "tiny", "v1"
# Grafana's interval variables, as Grafana would set them for a short range and a 1 s scrape.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not on PATH: install Debian's `prometheus` package "
                    "(apt-get install prometheus; .ci/run does)")
    return path


def test_promtool_accepts_the_rules_and_the_example_config():
    promtool = _binary("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(MONITORING / "prometheus.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


class Prometheus:
    """A Prometheus server scraping one target every second, with the alerting rules loaded."""

    def __init__(self, target: str, tmp: Path):
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(RULES)],
                  "scrape_configs": [{"job_name": "tokenmill", "static_configs": [{"targets": [target]}]}]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_file = open(tmp / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [_binary("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log_file, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def ready(self) -> bool:
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return self.proc.poll() is not None

    def query(self, expr: str) -> list[dict]:
        resp = self.http.get("/api/v1/query", params={"query": expr})
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def log(self) -> str:
        self.log_file.flush()
        self.log_file.seek(0)
        return self.log_file.read()

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def _load(client: httpx.Client) -> None:
    """A short, varied load: completions, a repeated long prompt (prefix-cache hits), streamed chats, and
    client errors (400s, a 404) so that the error series exist."""
    long_prompt = "The history of the Roman Empire spans many centuries, beginning with the founding of the " \
                  "city and ending with the fall of Constantinople. Historians divide it into periods such as"
    for prompt in ["Once upon a time", long_prompt, long_prompt]:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
    for _ in range(2):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6,
                "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert "[DONE]" in "".join(r.iter_text())
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1}).status_code == 400
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code == 400
    assert client.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"}).status_code == 404


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """`tokenmill serve` with one model (name and version), a Prometheus scraping it, and a short load run
    between scrapes, so that every rate() has samples from before and after it."""
    _binary("prometheus")
    tmp = tmp_path_factory.mktemp("monitoring")
    args = [f"{MODEL}:{VERSION}={default_model_path()}", "--dtype", "float32", "--kv-cache-memory", "64MiB",
            "--max-model-len", "512"]
    with ServeProcess(args, tmp / "server.log") as server:
        prom = Prometheus(f"127.0.0.1:{server.port}", tmp)
        try:
            assert wait_until(prom.ready, timeout=60, interval=0.2) and prom.proc.poll() is None, prom.log()

            def scraped() -> bool:
                return any(s["value"][1] == "1" for s in prom.query('up{job="tokenmill"}'))
            assert wait_until(scraped, timeout=30, interval=0.5), prom.log()
            _load(server.client)
            time.sleep(4)  # a few more scrapes and rule evaluations
            yield prom
        finally:
            prom.close()


def _substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables in expr ($name, ${name}, ${name:format}, [[name]]) replaced by their values."""
    def value(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        assert name in variables, f"unknown variable ${name} in {expr}"
        return variables[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def _template_variables(prom: Prometheus, dashboard: dict) -> dict[str, str]:
    """Each query variable's values as Grafana would fetch them from Prometheus (label_values(selector, label),
    in order, each with the earlier ones substituted), joined as Grafana joins a multi-value selection."""
    variables = dict(GRAFANA_INTERVALS)
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert m, f"variable {var['name']}: only label_values(selector, label) is checked: {query}"
        selector, label = _substitute(m.group(1), variables), m.group(2)
        resp = prom.http.get(f"/api/v1/label/{label}/values", params={"match[]": selector}).json()
        values = resp["data"]
        assert values, f"variable {var['name']}: {query} has no values"
        variables[var["name"]] = "(" + "|".join(re.escape(v) for v in values) + ")"
    return variables


def _panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' nested panels included."""
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend((panel["title"], t["expr"]) for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))
    walk(dashboard["panels"])
    return exprs


def _as_bool_comparisons(expr: str) -> str:
    """expr with `bool` after each comparison operator outside label matchers and strings: `X > 0.9` becomes
    `X > bool 0.9`. An alert's expression filters: it is empty unless the alert fires. With `bool` each
    comparison keeps every series, valued 0 or 1, so a non-empty result shows that the series it compares
    exist and the expression is valid, firing or not."""
    out, i, braces, quote = [], 0, 0, None
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = None
            i += 1
            continue
        if c in "\"'`":
            quote = c
        elif c == "{":
            braces += 1
        elif c == "}":
            braces -= 1
        elif braces == 0:
            m = re.match(r"(==|!=|>=|<=|>|<)(\s*bool\b)?", expr[i:])
            if m:
                out.append(m.group(1) + " bool" if not m.group(2) else m.group(0))
                i += m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def test_bool_substitution():
    assert _as_bool_comparisons('a{x!="1"} > 0.9') == 'a{x!="1"} > bool 0.9'
    assert _as_bool_comparisons('up == 0 or absent(up{j=">"})') == 'up == bool 0 or absent(up{j=">"})'
    assert _as_bool_comparisons("(a / b) >= bool 1") == "(a / b) >= bool 1"


def test_every_dashboard_expression_returns_data(prometheus):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = _template_variables(prometheus, dashboard)
    assert variables["model_name"] == f"({MODEL})" and variables["version"] == f"({VERSION})"
    exprs = _panel_exprs(dashboard)
    assert len(exprs) >= 20
    titles = {title for title, _ in exprs}
    for wanted in ("Request throughput", "Token throughput", "Time to first token", "Time per output token",
                   "End-to-end latency", "Queue time", "Running and waiting requests", "KV cache usage",
                   "Prefix cache hit rate", "Preemptions", "HTTP errors by status code", "Tokens per engine step"):
        assert wanted in titles, wanted
    empty, not_finite = [], []
    for title, expr in exprs:
        result = prometheus.query(_substitute(expr, variables))
        if not result:
            empty.append(f"{title}: {expr}")
        elif not any(math.isfinite(float(s["value"][1])) for s in result):
            not_finite.append(f"{title}: {expr} -> {result}")
        else:  # the model filter holds (HTTP requests rejected before they reached a model have none)
            models = {MODEL, None} if "http_requests_total" in expr else {MODEL}
            assert all(s["metric"].get("model_name") in models for s in result), (title, result)
    assert not empty, "expressions without data:\n" + "\n".join(empty)
    assert not not_finite, "expressions without a finite value:\n" + "\n".join(not_finite)
    errors = prometheus.query(_substitute(dict(exprs)["HTTP errors by status code"], variables))
    assert {s["metric"]["status"] for s in errors} >= {"400", "404"}


def test_every_alert_expression_returns_data_and_the_rules_evaluate(prometheus):
    rules = [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]
    assert {"TokenmillDown", "TokenmillQueueSaturated", "TokenmillHighErrorRate",
            "TokenmillKVCacheExhausted"} <= {r["alert"] for r in rules}
    for rule in rules:
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        result = prometheus.query(_as_bool_comparisons(rule["expr"]))
        assert result, f"{rule['alert']}: {rule['expr']} has no data"
        # None fires under this light load: every comparison is false.
        assert all(float(s["value"][1]) == 0 for s in result), (rule["alert"], result)

    def evaluated() -> list[dict]:
        loaded = [r for g in prometheus.http.get("/api/v1/rules").json()["data"]["groups"] for r in g["rules"]]
        done = all(r["lastEvaluation"] > "2000" for r in loaded) and len(loaded) == len(rules)
        return loaded if done else []
    assert wait_until(evaluated, timeout=10, interval=0.5), prometheus.log()
    for rule in evaluated():
        assert rule["health"] == "ok", rule
        assert rule["state"] == "inactive", rule

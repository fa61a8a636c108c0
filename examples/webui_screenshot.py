"""Retake docs/webui.png, the README's picture of the chat page: `tokenmill serve` on the default model, a short
conversation typed into the page in headless Chromium, a 1280x800 screenshot.

    python examples/webui_screenshot.py [--out docs/webui.png]

Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium.
"""
import argparse
import io
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.wait import WebDriverWait

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Write a Python function that adds two numbers."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "tokenmill.api.cli", "serve", "--port", str(port),
                               "--dtype", "float32", "--kv-cache-memory", "256MiB", "--max-model-len", "2048"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("tokenmill serve did not come up")


def screenshot(url: str) -> bytes:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")  # Debian's, never one Selenium would download
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        driver.get(url)
        wait = WebDriverWait(driver, 120, 0.1)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
        for field, value in (("temperature", "0"), ("max_tokens", "160")):
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
        for n, question in enumerate(QUESTIONS, 1):
            driver.find_element(By.ID, "input").send_keys(question, Keys.ENTER)
            wait.until(lambda d, n=n: d.execute_script(
                "return document.getElementById('stop').hidden "
                "&& document.querySelectorAll('.msg.assistant .stats').length === arguments[0]", n))
        driver.execute_script("document.activeElement.blur()")
        return driver.get_screenshot_as_png()
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "webui.png"))
    args = parser.parse_args()
    port = free_port()
    server = serve(port)
    try:
        png = screenshot(f"http://127.0.0.1:{port}/")
    finally:
        server.kill()
        server.wait()
    # A palette of 128 colours keeps the picture sharp (it is flat UI) and the file small.
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(128, dither=Image.Dither.NONE)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"{args.out}: {Path(args.out).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()

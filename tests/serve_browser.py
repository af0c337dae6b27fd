"""The chat page in headless Chromium (selenium + chromedriver): load it,
send a message, see streamed text arrive, stop a long answer, save a
screenshot.

Usage: serve_browser.py URL SCREENSHOT_PATH
"""
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, shot = sys.argv[1], sys.argv[2]
opts = webdriver.ChromeOptions()
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--window-size=412,915"]:  # a phone-sized screen
    opts.add_argument(a)
opts.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.set_page_load_timeout(30)
    driver.get(url)

    def wait(cond, what, timeout=60):
        t0 = time.time()
        while time.time() - t0 < timeout:
            v = cond()
            if v:
                return v
            time.sleep(0.05)
        raise SystemExit(f"timed out waiting for {what}")

    wait(lambda: "ready" in driver.find_element(By.ID, "status").text, "the model to be ready")
    box = driver.find_element(By.ID, "input")
    box.send_keys("What is the capital of France?")
    driver.find_element(By.ID, "send").click()
    # Streamed: text shows while the answer is still streaming.
    seen_partial = wait(
        lambda: driver.execute_script(
            "const m = document.querySelector('.assistant');"
            "return m && m.textContent.length > 0 && m.classList.contains('streaming');"
        ) or driver.find_elements(By.CSS_SELECTOR, ".assistant.done"),
        "streamed text",
    )
    wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".assistant.done"), "the answer to end")
    answer = driver.find_element(By.CSS_SELECTOR, ".assistant span").text
    # The page samples (temperature 0.7, no seed), so the words vary: check
    # that an answer arrived, not what it says.
    assert len(answer.strip()) > 0, "empty answer"
    assert driver.find_elements(By.CSS_SELECTOR, ".user"), "the message is not shown"

    # A second message keeps the history; the stop button ends an answer.
    box.send_keys("Write a very long story about a dragon.")
    driver.find_element(By.ID, "send").click()
    wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".assistant span")) == 2
         and driver.find_elements(By.CSS_SELECTOR, ".assistant span")[1].text, "the second answer")
    driver.find_element(By.ID, "stop").click()
    wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".assistant.done")) == 2, "stop")
    meta = driver.find_elements(By.CSS_SELECTOR, ".assistant .meta")[1].text
    assert "stopped" in meta, meta
    # The cluster view fills in (hidden behind a button on a phone).
    driver.find_element(By.ID, "toggle").click()
    wait(lambda: "leader" in driver.find_element(By.ID, "nodes").text, "the cluster view")
    driver.find_element(By.ID, "toggle").click()
    # Nothing was loaded from outside the device.
    hosts = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).host)")
    here = url.split("/")[2]
    assert all(h == here for h in hosts), hosts
    driver.save_screenshot(shot)
    print(f"browser: all checks passed; screenshot {shot}; first answer {answer!r}")
finally:
    driver.quit()

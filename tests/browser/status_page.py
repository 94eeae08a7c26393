"""The daemon's status page in a real headless Chromium, as a person sees it.

usage: status_page.py URL TOKEN SCREENSHOT_DIR

Run by the integration test `daemon::status_page_in_a_real_chromium`
against a daemon whose repository holds a backup. Checks that the page
loads without console errors or warnings, shows the backups and the window
bar, that a POST action without the token is refused with 401, that the
page's "Backup now" with the token starts a backup, and that the running
backup's progress changes live (server-sent events, no reload). Saves
screenshots. Prints one JSON line of what it saw; exits 1 with the reason
on the first failed check.
"""

import json
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def fail(why):
    print(json.dumps({"ok": False, "why": why}))
    sys.exit(1)


def wait(what, cond, within=60.0):
    deadline = time.time() + within
    last = None
    while time.time() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # the element is not there yet
            last = e
        time.sleep(0.2)
    fail(f"timed out waiting for {what} ({last})")


def main():
    url, token, shots = sys.argv[1], sys.argv[2], sys.argv[3]
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu",
              "--window-size=1400,1900", "--disable-dev-shm-usage"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    seen = {}
    try:
        driver.get(url)
        wait("the title", lambda: "walvault" in driver.find_element(By.ID, "title").text)
        rows = wait("the backups table", lambda: [
            r for r in driver.find_elements(By.CSS_SELECTOR, "#backups tbody tr")
            if not r.find_elements(By.CSS_SELECTOR, "td.empty")])
        seen["backup_rows"] = len(rows)
        marks = wait("backup marks on the window bar", lambda: driver.find_elements(
            By.CSS_SELECTOR, "#window-bar .backup-mark"))
        seen["backup_marks"] = len(marks)
        wait("the covered window", lambda: driver.find_elements(
            By.CSS_SELECTOR, "#window-bar .window-band"))
        seen["health"] = driver.find_element(By.ID, "health").text
        wait("the live event stream", lambda: driver.find_element(By.ID, "conn").text == "live")
        driver.save_screenshot(f"{shots}/status-page.png")

        logs = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        if logs:
            fail(f"console errors or warnings: {logs}")

        # an action without the token is refused (this logs the 401 in the
        # console: it is checked after the console)
        status = driver.execute_async_script(
            "const done = arguments[0];"
            "fetch('/api/jobs/backup', {method: 'POST'}).then(r => done(r.status), e => done(String(e)));")
        if status != 401:
            fail(f"POST without the token answered {status}, not 401")
        seen["without_token"] = status

        # with the token, the page's button starts a backup
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.ID, "btn-backup").click()
        result = wait("the action's result", lambda: driver.find_element(By.ID, "action-result").text)
        if "started" not in result:
            fail(f"Backup now answered {result!r}")
        seen["action"] = result

        # its progress, as the page shows it, changes without a reload
        texts = []
        deadline = time.time() + 120
        shot = False
        while time.time() < deadline:
            # read in one script: the page re-renders the element on each event
            t = driver.execute_script(
                "const e = document.querySelector('#running .job .progress-text');"
                "return e ? e.textContent : null;")
            if t is not None:
                if t and (not texts or texts[-1] != t):
                    texts.append(t)
                if len(texts) >= 2 and not shot:
                    driver.save_screenshot(f"{shots}/status-page-backup-running.png")
                    shot = True
            elif texts:
                break  # it ended
            time.sleep(0.1)
        between = [t for t in texts if "%" in t and not t.startswith(("0 %", "100 %"))]
        if len(texts) < 3 or not between:
            fail(f"the backup's progress did not change live: {texts}")
        seen["progress"] = texts[:6]
        wait("the backup in the recent jobs", lambda: any(
            "backup" in r.text and "succeeded" in r.text
            for r in driver.find_elements(By.CSS_SELECTOR, "#recent tbody tr")), within=120)
        driver.save_screenshot(f"{shots}/status-page.png")
        print(json.dumps({"ok": True, **seen}))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()

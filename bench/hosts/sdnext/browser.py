"""SD.Next's page in a real headless browser: the Hybrid VAE settings, SD.Next's settings search, the accordion.

usage: python browser.py [--url http://127.0.0.1:7861] [--img docs/img] [--out DIR]

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``) and ``selenium``
(PyPI). Chromium runs with --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
--disable-background-networking --disable-component-update --disable-sync and a fresh --user-data-dir.

Checks (exit 1 when one fails): the settings section shows the 14 options and the token field is a password field;
typing "hybrid" into SD.Next's settings search (``#settings_search``; ui/settings.ts shows a row when its text
contains the query) leaves all 14 visible; the txt2img accordion opens, offers "as in settings", and its hint says
why remote would not happen while remote decode is off (also after choosing "remote"); the browser console has no
errors. Screenshots: IMG/sdnext-settings.png, IMG/sdnext-settings-search.png, IMG/sdnext-accordion.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1100")


def browser(profile: str) -> webdriver.Chrome:
    o = webdriver.ChromeOptions()
    for f in (*FLAGS, f"--user-data-dir={profile}"):
        o.add_argument(f)
    o.binary_location = "/usr/bin/chromium"
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    d.set_script_timeout(300)
    d.set_page_load_timeout(600)
    return d


def js(d: webdriver.Chrome, script: str, *args: object) -> object:
    for _ in range(60):  # the page's own scripts keep 2 CPU cores busy for a while after load
        try:
            return d.execute_script(script, *args)
        except Exception:  # a script timeout while SD.Next's UI initialises: retry
            time.sleep(2)
    raise TimeoutError(script[:80])


def wait(d: webdriver.Chrome, script: str, timeout: float = 600) -> object:
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = js(d, script)
        if v:
            return v
        time.sleep(1)
    raise TimeoutError(f"waited {timeout}s for: {script[:120]}")


def click_tab(d: webdriver.Chrome, text: str, within: str = "document") -> None:
    js(d, f"const b=[...{within}.querySelectorAll('button')].find(x=>x.innerText.trim()===arguments[0]);"
          "if(!b) throw new Error('no tab '+arguments[0]); b.click();", text)
    time.sleep(1.5)


VISIBLE = "(e => !!e && e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden')"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7861/")
    ap.add_argument("--img", type=Path, default=Path(__file__).resolve().parents[3] / "docs" / "img")
    ap.add_argument("--out", type=Path, default=Path("."))
    a = ap.parse_args(argv)
    a.img.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def check(name: str, ok: bool, **ev: object) -> None:
        results.append({"check": name, "ok": bool(ok), **ev})
        print(f"{'ok     ' if ok else 'FAILED '} {name}  {json.dumps(ev, default=str)[:500]}")

    d = browser(tempfile.mkdtemp(prefix="hv-chromium-"))
    try:
        d.get(a.url)
        wait(d, "return document.querySelectorAll('[id^=setting_hybrid_vae_]').length >= 14 && "
                "!!document.querySelector('#hybrid_vae_txt2img')")
        wait(d, "const s=document.querySelector('#splash'); return !s || getComputedStyle(s).display==='none'", 300)
        time.sleep(5)
        # ---- settings section ------------------------------------------------------------------------
        click_tab(d, "System")
        click_tab(d, "Settings", "document.querySelector('#system')")
        click_tab(d, "Hybrid VAE", "document.querySelector('#settings')")
        d.set_window_size(1400, 2600)  # tall enough for the whole section in one screenshot
        time.sleep(2)
        section = d.find_element(By.ID, "settings_section_tab_hybrid_vae")
        ids = js(d, f"return [...document.querySelectorAll('#settings_section_tab_hybrid_vae [id^=setting_hybrid_vae_]')]"
                    f".filter({VISIBLE}).map(e=>e.id)")
        token_type = js(d, "const e=document.querySelector('#setting_hybrid_vae_hf_token');"
                           "const i=e && e.querySelector('input,textarea'); return i ? i.type : null")
        section.screenshot(str(a.img / "sdnext-settings.png"))
        check("settings section shows all 14 options; the token field is a password field",
              len(ids) == 14 and token_type == "password", visible=ids, token_input_type=token_type)
        # ---- SD.Next's settings search --------------------------------------------------------------------
        box = d.find_element(By.CSS_SELECTOR, "#settings_search textarea")
        box.clear()
        box.send_keys("hybrid")
        box.send_keys(Keys.ENTER)
        time.sleep(3)
        found = js(d, f"return [...document.querySelectorAll('[id^=setting_hybrid_vae_]')].filter({VISIBLE}).map(e=>e.id)")
        others = js(d, f"return [...document.querySelectorAll('#settings .settings_section')].filter({VISIBLE})"
                       ".map(r=>(r.querySelector('[id^=setting_]')||{}).id).filter(x=>x && !x.startsWith('setting_hybrid_vae_'))")
        js(d, "document.querySelector('#settings_search').scrollIntoView({block:'start'})")
        d.save_screenshot(str(a.img / "sdnext-settings-search.png"))  # the query, the section tabs, what is shown
        check('SD.Next\'s settings search for "hybrid" finds every option', len(found) == 14,
              found=len(found), other_settings_still_shown=others)
        box.clear()
        box.send_keys(Keys.ENTER)
        d.set_window_size(1400, 1100)
        # ---- the accordion -----------------------------------------------------------------------------
        click_tab(d, "Text")
        acc = d.find_element(By.ID, "hybrid_vae_txt2img")
        js(d, "arguments[0].scrollIntoView({block:'center'}); arguments[0].querySelector('.label-wrap').click();", acc)
        wait(d, f"return {VISIBLE}(document.querySelector('#hybrid_vae_txt2img_mode'))", 60)
        hint = wait(d, "const h=document.querySelector('#hybrid_vae_txt2img_hint'); return h && h.innerText.trim()", 60)
        choices = js(d, "return [...document.querySelectorAll('#hybrid_vae_txt2img_mode input')].map(i=>i.value)")
        js(d, "[...document.querySelectorAll('#hybrid_vae_txt2img_mode label')].find(l=>l.innerText.trim()==='remote').click()")
        after = wait(d, "const t=document.querySelector('#hybrid_vae_txt2img_hint').innerText; "
                        "return t.includes('This generation decodes locally') && t", 120)
        time.sleep(1)
        acc.screenshot(str(a.img / "sdnext-accordion.png"))
        check("accordion: plain-words default; the hint says why remote would not happen while remote decode is off",
              choices[:1] == ["as in settings"] and "settings default" not in choices
              and str(hint).startswith("Remote would not happen: remote decode is off")
              and "This generation decodes locally" in str(after),
              choices=choices, hint=hint, hint_after_choosing_remote=after)
        js(d, "[...document.querySelectorAll('#hybrid_vae_txt2img_mode label')]"
              ".find(l=>l.innerText.trim()==='as in settings').click()")
        # ---- the browser console ---------------------------------------------------------------------------
        logs = d.get_log("browser")
        errors = [e for e in logs if e.get("level") == "SEVERE"]
        check("no errors in the browser console", not errors, entries=len(logs), errors=[e["message"][:300] for e in errors])
    finally:
        d.quit()
        (a.out / "browser.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks ok" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed or len(results) < 4 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

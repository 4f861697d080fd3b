"""Helpers for tests/live/test_browser.py: drive a WebUI page in headless Chromium with Playwright.

Works on both DOMs the hosts have: Gradio 3.41 (A1111, reForge, Forge Classic) and Gradio 4.40
(Forge 2, Forge Neo). Elements are found by elem_id only; every setter checks what the page shows
afterwards, so a control the page did not take fails here and not in a later assertion.

Chromium is the system one (Debian's ``chromium``; ``CHROMIUM=<path>`` overrides): browsers
cannot be downloaded here, so never ``playwright install``.
"""

import os
import re
import shutil

LOAD_TIMEOUT_MS = 180_000


def chromium_path():
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def launch(playwright):
    return playwright.chromium.launch(
        executable_path=chromium_path(),
        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])


class Console:
    """Console errors and uncaught exceptions of a page, kept from the first load on."""

    def __init__(self, page):
        self.entries = []  # (kind, text, url)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.entries.append(
            ("pageerror", f"{error}\n{getattr(error, 'stack', '') or ''}", "")))

    def _console(self, msg):
        if msg.type in ("error", "warning"):
            url = (msg.location or {}).get("url", "")
            self.entries.append((msg.type, msg.text, url))

    def errors(self):
        return [e for e in self.entries if e[0] in ("error", "pageerror")]

    def mentioning(self, word):
        word = word.lower()
        return [e for e in self.entries if word in e[1].lower() or word in e[2].lower()]


def open_ui(page, url, ready_id):
    """Load the WebUI and wait until the element ``ready_id`` (one of ours) is on the page."""
    page.goto(url, timeout=LOAD_TIMEOUT_MS)
    page.wait_for_selector("#txt2img_generate", state="attached", timeout=LOAD_TIMEOUT_MS)
    page.wait_for_selector(f"#{ready_id}", state="attached", timeout=LOAD_TIMEOUT_MS)
    page.wait_for_timeout(1500)  # the WebUI's onUiLoaded handlers (tooltips, input accordions)


def switch_tab(page, name):
    """Click the top-level tab ``name`` ("txt2img", "img2img")."""
    clicked = page.evaluate("""(name) => {
        const app = typeof gradioApp === 'function' ? gradioApp() : document;
        const byId = app.querySelector('#tab_' + name + '-button');  // Gradio 4
        if (byId) { byId.click(); return true; }
        for (const b of app.querySelectorAll('#tabs button')) {  // Forge 2 writes "Txt2img"
            if (b.textContent.trim().toLowerCase() === name.toLowerCase()) { b.click(); return true; }
        }
        return false;
    }""", name)
    assert clicked, f"no top-level tab {name!r}"
    page.wait_for_selector(f"#tab_{name}", state="visible", timeout=10_000)


def _in(scope, elem_id):
    return f"{scope} #{elem_id}" if scope else f"#{elem_id}"


# --- input accordions (ours, Hires. fix) ---------------------------------------------------------

def accordion_checkbox(page, elem_id):
    return page.locator(f"#{elem_id}-visible-checkbox")


def open_accordion(page, elem_id, inside_id):
    """Open an accordion by clicking its title (not an input accordion's checkbox) unless the
    element ``inside_id`` in it is already visible."""
    inside = page.locator(f"#{inside_id}").first
    if inside.is_visible():
        return
    label = page.locator(f"#{elem_id} > .label-wrap").first
    box = label.bounding_box()
    label.click(position={"x": box["width"] - 12, "y": box["height"] / 2})
    inside.wait_for(state="visible", timeout=10_000)
    page.wait_for_timeout(300)


def set_accordion_checked(page, elem_id, value):
    box = accordion_checkbox(page, elem_id)
    if box.is_checked() != value:
        box.click()
    page.wait_for_timeout(200)
    assert box.is_checked() == value, f"{elem_id}: the checkbox did not become {value}"


# --- plain controls --------------------------------------------------------------------------------

def set_number(page, elem_id, value, scope=""):
    """A Slider's or Number's number box: type the value, then leave the box (Gradio 3 takes it on
    blur / change, Gradio 4 on input)."""
    box = page.locator(f"{_in(scope, elem_id)} input[type=number]").first
    box.fill(str(value))
    box.dispatch_event("change")
    box.press("Tab")
    page.wait_for_timeout(200)
    assert float(box.input_value()) == float(value), f"{elem_id}: {box.input_value()} != {value}"


def number_value(page, elem_id, scope=""):
    return float(page.locator(f"{_in(scope, elem_id)} input[type=number]").first.input_value())


def set_checkbox(page, elem_id, value, scope=""):
    box = page.locator(f"{_in(scope, elem_id)} input[type=checkbox]").first
    box.set_checked(value)
    page.wait_for_timeout(100)
    assert box.is_checked() == value


def checkbox_value(page, elem_id, scope=""):
    return page.locator(f"{_in(scope, elem_id)} input[type=checkbox]").first.is_checked()


def set_radio(page, elem_id, value, scope=""):
    page.locator(f"{_in(scope, elem_id)} input[type=radio][value='{value}']").first.check()
    page.wait_for_timeout(100)
    assert radio_value(page, elem_id, scope) == value


def radio_value(page, elem_id, scope=""):
    return page.evaluate("""(sel) => { const r = document.querySelector(sel + ' input[type=radio]:checked');
                                        return r ? r.value : null; }""", _in(scope, elem_id))


def set_textbox(page, elem_id, text, scope=""):
    box = page.locator(f"{_in(scope, elem_id)} textarea").first
    box.fill(text)
    box.dispatch_event("change")
    page.wait_for_timeout(100)


def dropdown_value(page, elem_id, scope=""):
    return page.locator(f"{_in(scope, elem_id)} input").first.input_value()


_OPTION_NAMES = """(sel) => Array.from(document.querySelectorAll(sel + ' ul.options li')).map(li =>
    li.getAttribute('aria-label') || li.getAttribute('data-value') ||
    li.textContent.replace('\u2713', '').trim())"""


def _open_options(page, sel):
    box = page.locator(f"{sel} input").first
    box.click()
    page.locator(f"{sel} ul.options li").first.wait_for(state="visible", timeout=10_000)
    return box


def dropdown_options(page, elem_id, scope=""):
    """The names a dropdown offers (Gradio 3 and 4 render them only while it is open; Gradio 4
    puts a hidden check mark in each)."""
    sel = _in(scope, elem_id)
    box = _open_options(page, sel)
    names = page.evaluate(_OPTION_NAMES, sel)
    box.press("Escape")
    box.blur()
    page.wait_for_timeout(300)
    return names


def set_dropdown(page, elem_id, value, scope=""):
    sel = _in(scope, elem_id)
    box = page.locator(f"{sel} input").first
    if box.input_value() == value:
        return
    _open_options(page, sel)
    names = page.evaluate(_OPTION_NAMES, sel)
    assert value in names, f"{elem_id}: {value!r} not among {names}"
    page.locator(f"{sel} ul.options li").nth(names.index(value)).click()
    page.wait_for_timeout(500)
    assert box.input_value() == value, f"{elem_id}: {box.input_value()!r} != {value!r}"


def title_of(page, elem_id, scope=""):
    """The tooltip (``title``) the host put on a control: on its block or the nearest element
    inside it that has one."""
    return page.evaluate("""(sel) => {
        const el = document.querySelector(sel);
        if (!el) return null;
        if (el.title) return el.title;
        const inner = el.querySelector('[title]');
        return inner ? inner.title : '';
    }""", _in(scope, elem_id))


# --- results ---------------------------------------------------------------------------------------

def gallery_image_sizes(page, gallery_id):
    """(width, height) of each distinct image in a gallery, in page order."""
    return [tuple(s) for s in page.evaluate("""async (id) => {
        const srcs = [];
        for (const img of document.querySelectorAll('#' + id + ' img')) {
            if (img.src && !srcs.includes(img.src)) srcs.push(img.src);
        }
        const sizes = [];
        for (const src of srcs) {
            const im = new Image();
            im.src = src;
            await im.decode();
            sizes.push([im.naturalWidth, im.naturalHeight]);
        }
        return sizes;
    }""", gallery_id)]


def wait_for_images(page, tab, count, timeout_ms):
    """Wait until the tab's gallery shows ``count`` distinct images and its infotext is written."""
    page.wait_for_function("""([tab, count]) => {
        const info = document.getElementById('html_info_' + tab);
        const srcs = new Set(Array.from(document.querySelectorAll('#' + tab + '_gallery img'))
                             .map(i => i.src).filter(Boolean));
        return info && info.innerText.includes('Steps:') && srcs.size >= count;
    }""", arg=[tab, count], timeout=timeout_ms, polling=1000)

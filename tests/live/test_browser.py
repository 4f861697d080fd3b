"""The WebUI page itself, in headless Chromium: the AccDiffusion accordion in txt2img and img2img
with its tooltips, the "Hires. fix is off" note of javascript/accdiffusion.js, Generate with
AccDiffusion on (image size and infotext in the page), the tile-prompt map in the gallery, the ↙
paste of an infotext restoring our settings, our X/Y/Z plot axes in the axis dropdown, and no
console error from our script.

    SD_WEBUI_URL=http://127.0.0.1:7866 SD_WEBUI_HOST=neo OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/live/test_browser.py

Needs Playwright from PyPI (``.venv/bin/pip install playwright``) and Debian's ``chromium``
(``CHROMIUM=<path>`` for another binary; never ``playwright install``). Skipped without
SD_WEBUI_URL, or without either of them. SD_WEBUI_HOST = a1111|forge|neo|reforge|classic (Neo
has no latent upscaler: its hires pass uses "None"). Screenshots of the opened accordion go to
SD_WEBUI_SHOTS (default /tmp/browser-shots), named after the host. Use a tiny model: one
128 → 256 px generation with 3 + 3 steps.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

URL = os.environ.get("SD_WEBUI_URL")
try:
    from hosts import HOST  # tests/live/hosts.py: per-host quirks, from SD_WEBUI_HOST

    HOST_NAME = HOST.name
    HIRES_UPSCALER = HOST.upscaler("Latent")  # "None" on Neo, which has no latent upscaler
except ImportError:
    HOST_NAME = os.environ.get("SD_WEBUI_HOST") or ("forge" if os.environ.get("SD_WEBUI_FORGE") == "1" else "a1111")
    HIRES_UPSCALER = "None" if HOST_NAME == "neo" else "Latent"
SHOTS = os.environ.get("SD_WEBUI_SHOTS", "/tmp/browser-shots")

pytestmark = pytest.mark.skipif(not URL, reason="set SD_WEBUI_URL to run against a live WebUI")

if URL:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs Playwright: .venv/bin/pip install playwright")
    import browser as ui  # noqa: E402

    if ui.chromium_path() is None:
        pytest.skip("needs Chromium (apt-get install chromium, or CHROMIUM=<path>)",
                    allow_module_level=True)

from accdiffusion.entry import surfaces as glue  # noqa: E402
from accdiffusion.method.settings import FIELDS, AccDiffusionSettings  # noqa: E402


PROMPT = "a red-haired astronaut riding a horse on the moon"
GENERATE_TIMEOUT_MS = 600_000
# What the generation sets besides the switch, and the paste test restores; all differ from the
# defaults (booleans in both directions, a slider of each kind, a radio).
CHOSEN = dict(tile_prompt_map=True, window_mode="overlap", dilated_sampling=False,
              patch_prompt_threshold=0.4, cosine_scale_1=2.5, stride=16)
EVERYDAY = {f.name for f in glue.everyday_fields()}


def ours(tab, name):
    return f"script_{tab}_accdiffusion_{name}"


def accordion(tab):
    return ours(tab, "enabled")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = ui.launch(pw)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def session(browser):
    """One page for the module (loading the WebUI takes seconds); tests that need clean controls
    reload it. ``console`` keeps every console error since the first load."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    console = ui.Console(page)
    ui.open_ui(page, URL, accordion("txt2img"))
    yield page, console
    page.close()


@pytest.fixture
def page(session):
    page, _ = session
    ui.switch_tab(page, "txt2img")
    return page


def reload(page):
    ui.open_ui(page, URL, accordion("txt2img"))


def open_everything(page, tab):
    ui.open_accordion(page, accordion(tab), ours(tab, "patch_prompts"))
    ui.open_accordion(page, ours(tab, "advanced"), ours(tab, "skip_residual"))


def set_setting(page, tab, name, value):
    field = next(f for f in FIELDS if f.name == name)
    elem_id = ours(tab, name)
    if name == "enabled":
        ui.set_accordion_checked(page, elem_id, value)
    elif field.kind is bool:
        ui.set_checkbox(page, elem_id, value)
    elif field.kind is str:
        ui.set_radio(page, elem_id, value)
    else:
        ui.set_number(page, elem_id, value)


def read_setting(page, tab, name):
    field = next(f for f in FIELDS if f.name == name)
    elem_id = ours(tab, name)
    if name == "enabled":
        return ui.accordion_checkbox(page, elem_id).is_checked()
    if field.kind is bool:
        return ui.checkbox_value(page, elem_id)
    if field.kind is str:
        return ui.radio_value(page, elem_id)
    return field.kind(ui.number_value(page, elem_id))


# --- the accordion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_accordion_with_every_control_its_default_and_tooltip(page, tab):
    ui.switch_tab(page, tab)
    acc = page.locator(f"#{accordion(tab)}")
    assert acc.is_visible()
    assert glue.TITLE in acc.locator(".label-wrap").first.inner_text()
    assert not ui.accordion_checkbox(page, accordion(tab)).is_checked()  # off by default
    open_everything(page, tab)
    for field in FIELDS[1:]:
        elem_id = ours(tab, field.name)
        control = page.locator(f"#{elem_id}")
        assert control.count() == 1, f"{elem_id} missing"
        assert control.is_visible(), f"{elem_id} not shown"
        assert field.label in control.inner_text(), f"{elem_id}: label {field.label!r} not shown"
        assert ui.title_of(page, elem_id) == field.tooltip, f"{elem_id}: tooltip"
        assert read_setting(page, tab, field.name) == field.default, f"{elem_id}: default"
        # everyday settings outside "Advanced", the rest inside it
        in_advanced = page.locator(f"#{ours(tab, 'advanced')} #{elem_id}").count() == 1
        assert in_advanced == (field.name not in EVERYDAY), f"{elem_id}: wrong group"
    has_note = page.locator(f"#{ours(tab, 'hires_note')}").count() > 0  # Gradio 3: twice (block, inner)
    assert has_note == (tab == "txt2img")  # img2img needs no hires fix
    assert page.locator(f"#{ours(tab, 'host_note')}").count() == 0  # every host here is a known one
    os.makedirs(SHOTS, exist_ok=True)
    ui.set_accordion_checked(page, accordion(tab), True)  # as a user sees it: on, the note showing
    page.wait_for_timeout(1500)
    acc.screenshot(path=os.path.join(SHOTS, f"{HOST_NAME}-{tab}-accordion.png"))
    ui.set_accordion_checked(page, accordion(tab), False)


def test_hires_off_note_follows_both_switches(page):
    note = page.locator(f"#{glue.HIRES_NOTE_ID}")
    ui.set_accordion_checked(page, "txt2img_hr", False)
    ui.set_accordion_checked(page, accordion("txt2img"), False)
    page.wait_for_timeout(1500)
    assert not note.is_visible()
    ui.set_accordion_checked(page, accordion("txt2img"), True)  # ours on, hires off: the note
    ui.open_accordion(page, accordion("txt2img"), ours("txt2img", "patch_prompts"))
    note.wait_for(state="visible", timeout=5_000)
    assert note.inner_text().strip() == glue.HIRES_NOTE_TEXT
    ui.set_accordion_checked(page, "txt2img_hr", True)
    note.wait_for(state="hidden", timeout=5_000)
    ui.set_accordion_checked(page, "txt2img_hr", False)
    note.wait_for(state="visible", timeout=5_000)
    ui.set_accordion_checked(page, accordion("txt2img"), False)
    note.wait_for(state="hidden", timeout=5_000)


# --- Generate ----------------------------------------------------------------------------------------

_generated = {}


def test_generate_with_accdiffusion_on_and_the_tile_prompt_map(page):
    reload(page)
    ui.set_textbox(page, "txt2img_prompt", PROMPT)
    for elem_id, value in [("txt2img_width", 128), ("txt2img_height", 128), ("txt2img_steps", 3),
                           ("txt2img_seed", 5)]:
        ui.set_number(page, elem_id, value)
    ui.set_accordion_checked(page, "txt2img_hr", True)
    ui.open_accordion(page, "txt2img_hr", "txt2img_hires_steps")
    ui.set_dropdown(page, "txt2img_hr_upscaler", HIRES_UPSCALER)
    ui.set_number(page, "txt2img_hr_scale", 2)
    ui.set_number(page, "txt2img_hires_steps", 3)
    ui.set_accordion_checked(page, accordion("txt2img"), True)
    open_everything(page, "txt2img")
    for name, value in CHOSEN.items():
        set_setting(page, "txt2img", name, value)
    page.locator("#txt2img_generate").click()
    ui.wait_for_images(page, "txt2img", 2, GENERATE_TIMEOUT_MS)
    info = page.locator("#html_info_txt2img").first.inner_text()  # Gradio 3: the id twice
    _generated["info"] = info
    _generated["sizes"] = ui.gallery_image_sizes(page, "txt2img_gallery")
    os.makedirs(SHOTS, exist_ok=True)
    results = page.locator("#txt2img_results")
    (results if results.count() else page.locator("#txt2img_gallery")).first.screenshot(
        path=os.path.join(SHOTS, f"{HOST_NAME}-txt2img-generated.png"))
    expected = AccDiffusionSettings(enabled=True, **CHOSEN).infotext_params()
    for key, value in expected.items():
        assert f"{key}: {value}" in info, f"{key}: {value} not in the page's infotext:\n{info}"
    assert "Size: 128x128" in info and "Hires upscale: 2" in info, info
    assert "AccDiffusion stepped aside" not in info, info
    # the image at the hires size, then its tile-prompt map at the same size
    assert _generated["sizes"] == [(256, 256), (256, 256)], _generated["sizes"]


def test_tile_prompt_map_is_the_second_gallery_image(page):
    if "sizes" not in _generated:
        pytest.skip("the generation above did not finish")
    imgs = page.evaluate("""() => Array.from(new Set(Array.from(
        document.querySelectorAll('#txt2img_gallery img')).map(i => i.src).filter(Boolean)))""")
    assert len(imgs) == 2, imgs
    image, tile_map = (page.request.get(src).body() for src in imgs)
    assert image != tile_map  # the map is drawn over the image, not a copy of it


# --- paste --------------------------------------------------------------------------------------------

def infotext_for(settings):
    params = {"Steps": 3, "Sampler": "Euler", "CFG scale": 7, "Seed": 5, "Size": "128x128",
              "Denoising strength": 0.6, "Hires upscale": 2, "Hires steps": 3,
              "Hires upscaler": HIRES_UPSCALER, **settings.infotext_params()}
    return PROMPT + "\nNegative prompt: blurry\n" + ", ".join(f"{k}: {v}" for k, v in params.items())


def paste(page, infotext):
    """Put ``infotext`` into the prompt and press ↙. The negative prompt is emptied first: Forge
    Classic and Neo disable ↙ while it has text (their option "paste_safe_guard")."""
    ui.set_textbox(page, "txt2img_neg_prompt", "")
    ui.set_textbox(page, "txt2img_prompt", infotext)
    button = page.locator("#tab_txt2img #paste").first
    page.wait_for_function("(b) => !b.disabled", arg=button.element_handle(), timeout=10_000)
    button.click()
    page.wait_for_function("() => !document.querySelector('#txt2img_prompt textarea').value.includes('Steps:')",
                           timeout=20_000)
    page.wait_for_timeout(1500)


def test_paste_restores_our_settings(page):
    reload(page)  # every control at its default
    settings = AccDiffusionSettings(enabled=True, **CHOSEN)
    paste(page, infotext_for(settings))
    assert page.locator("#txt2img_prompt textarea").input_value() == PROMPT
    open_everything(page, "txt2img")
    for field in FIELDS:
        assert read_setting(page, "txt2img", field.name) == getattr(settings, field.name), field.name
    assert ui.accordion_checkbox(page, "txt2img_hr").is_checked()  # the host's own, as a sanity check


def test_paste_of_an_infotext_without_accdiffusion_turns_it_off(page):
    # the page still holds the pasted settings of the test above (or is fresh): paste a plain one
    if not ui.accordion_checkbox(page, accordion("txt2img")).is_checked():
        set_setting(page, "txt2img", "enabled", True)
        open_everything(page, "txt2img")
        set_setting(page, "txt2img", "window_mode", "overlap")  # not the default
    paste(page, infotext_for(AccDiffusionSettings()))
    assert not read_setting(page, "txt2img", "enabled")
    open_everything(page, "txt2img")
    # an infotext of another job puts the defaults back (infotext_absent applies to AccDiffusion's own)
    assert read_setting(page, "txt2img", "window_mode") == AccDiffusionSettings().window_mode == "shifted"


# --- X/Y/Z plot ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_our_axes_in_the_xyz_plot_dropdown(page, tab):
    ui.switch_tab(page, tab)
    scope = f"#tab_{tab}"
    scripts = ui.dropdown_options(page, "script_list", scope=scope)
    xyz = next(s for s in scripts if s.lower() == "x/y/z plot")  # "X/Y/Z Plot" on Forge Classic
    ui.set_dropdown(page, "script_list", xyz, scope=scope)
    x_type = f"script_{tab}_xyz_plot_x_type"
    page.locator(f"#{x_type}").wait_for(state="visible", timeout=10_000)
    options = ui.dropdown_options(page, x_type)
    wanted = [spec.label for spec in glue.xyz_axis_specs()]
    assert [o for o in options if o.startswith(glue.TITLE)] == wanted
    ui.set_dropdown(page, "script_list", "None", scope=scope)


# --- the console -----------------------------------------------------------------------------------------

def test_our_script_is_loaded_and_logs_no_error(session):
    page, console = session
    srcs = page.evaluate("() => Array.from(document.querySelectorAll('script[src]')).map(s => s.src)")
    assert any("accdiffusion.js" in s for s in srcs), "javascript/accdiffusion.js is not on the page"
    ours_ = [e for e in console.mentioning("accdiffusion") if e[0] in ("error", "pageerror")]
    assert not ours_, ours_

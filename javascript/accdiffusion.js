// AccDiffusion: show "Hires. fix is off" while AccDiffusion is on and Hires. fix is off (txt2img).
// Plain DOM only (works with the Gradio 3 of A1111 and the Gradio 4 of Forge); silent when any
// element is missing.
(function() {
    var NOTE_ID = "accdiffusion-hires-note";

    function root() {
        try {
            if (typeof gradioApp === "function") {
                return gradioApp();
            }
        } catch (e) {
            // fall through
        }
        return document;
    }

    // State of an InputAccordion: its visible checkbox, else its hidden Gradio checkbox, else
    // whether the accordion is open. null when the accordion is not on the page.
    function accordionChecked(app, id) {
        var box = app.querySelector("#" + id + "-visible-checkbox") ||
            app.querySelector("#" + id + "-checkbox input[type=checkbox]") ||
            app.querySelector("input#" + id + "-checkbox");
        if (box) {
            return !!box.checked;
        }
        var accordion = app.querySelector("#" + id);
        if (accordion) {
            return accordion.classList.contains("input-accordion-open");
        }
        return null;
    }

    function update() {
        var app = root();
        if (!app || !app.querySelector) {
            return;
        }
        var note = app.querySelector("#" + NOTE_ID);
        if (!note) {
            return;
        }
        var ours = accordionChecked(app, note.getAttribute("data-accordion") || "script_accdiffusion_enabled");
        var hires = accordionChecked(app, "txt2img_hr");
        var show = ours === true && hires === false;
        var display = show ? "" : "none";
        if (note.style.display !== display) {
            note.style.display = display;
        }
    }

    var pending = false;
    function schedule() {
        if (pending) {
            return;
        }
        pending = true;
        setTimeout(function() {
            pending = false;
            try {
                update();
            } catch (e) {
                // never break the page
            }
        }, 50);
    }

    document.addEventListener("input", schedule, true);
    document.addEventListener("change", schedule, true);
    document.addEventListener("click", schedule, true);
    if (typeof onUiLoaded === "function") {
        onUiLoaded(schedule);
    }
    if (typeof onUiUpdate === "function") {
        onUiUpdate(schedule);
    }
    // Programmatic changes (paste, "send to") fire no DOM event the page can see everywhere.
    setInterval(schedule, 1000);
})();

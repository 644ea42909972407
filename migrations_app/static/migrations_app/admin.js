// The migration pages of the admin.
// - Forms marked data-confirm ask first; forms marked data-once submit once (a double click
//   on "Start migration" must not start two batches). Listeners sit on the document, so they
//   hold for forms swapped in by the refresh below.
// - A batch dashboard or station timeline stays current while it moves: every few seconds it
//   fetches the same page and swaps in the regions marked .mig-live[id]. It stops once the
//   page says it is final (data-mig-live="0") and skips a turn while the operator is typing.
"use strict";
(function () {
    document.addEventListener("submit", function (event) {
        const form = event.target;
        const message = form.dataset.confirm;
        if (message && !window.confirm(message)) {
            event.preventDefault();
            return;
        }
        if ("once" in form.dataset) {
            if (form.dataset.sent) {
                event.preventDefault();
            }
            form.dataset.sent = "1";
        }
    });

    const root = document.querySelector("[data-mig-live]");

    if (!root) {
        return;
    }
    const every = (Number(root.dataset.refreshSeconds) || 3) * 1000;

    function editing() {
        const active = document.activeElement;
        if (active && active.closest(".mig-live") && active.matches("input, select, textarea")) {
            return true;
        }
        return Array.from(document.querySelectorAll(".mig-live input[type=text]")).some(
            function (input) { return input.value !== input.defaultValue; }
        );
    }

    async function refresh() {
        if (root.dataset.migLive !== "1") {
            return;
        }
        if (!document.hidden && !editing()) {
            try {
                const response = await fetch(window.location.href, {
                    credentials: "same-origin",
                    cache: "no-store",
                    headers: {"X-Requested-With": "XMLHttpRequest"},
                });
                if (response.ok) {
                    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
                    const freshRoot = fresh.querySelector("[data-mig-live]");
                    if (freshRoot) {
                        document.querySelectorAll(".mig-live[id]").forEach(function (region) {
                            const next = fresh.getElementById(region.id);
                            if (next) {
                                region.replaceWith(document.importNode(next, true));
                            }
                        });
                        root.dataset.migLive = freshRoot.dataset.migLive;
                        document.title = fresh.title;
                    } else {
                        root.dataset.migLive = "0";  // logged out, or not this page any more
                    }
                }
            } catch (error) {
                // A network blip: the next turn tries again.
            }
        }
        if (root.dataset.migLive === "1") {
            window.setTimeout(refresh, every);
        }
    }

    window.setTimeout(refresh, every);
})();

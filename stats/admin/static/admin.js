// The dashboard without reloads: a period button (or the browser's back button) fetches the
// page for the new URL and swaps its <main>; the same happens every 30 s. Without script the
// buttons submit their form and the page still works.
"use strict";

(() => {
  let inFlight = null;

  async function load(url) {
    inFlight?.abort();
    const controller = new AbortController();
    inFlight = controller;
    document.querySelector("main").setAttribute("aria-busy", "true");
    try {
      const response = await fetch(url, {
        signal: controller.signal,
        credentials: "same-origin",
        headers: { Accept: "text/html" },
      });
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const main = page.querySelector("main");
      if (main) {
        document.querySelector("main").replaceWith(main);
        document.title = page.title;
      }
    } catch (error) {
      if (error.name !== "AbortError") {
        document.querySelector("main").setAttribute("data-error", String(error));
      }
    } finally {
      if (inFlight === controller) {
        inFlight = null;
        document.querySelector("main").setAttribute("aria-busy", "false");
      }
    }
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-period]");
    if (!button) return;
    event.preventDefault();
    const url = new URL(window.location.href);
    url.searchParams.set("period", button.dataset.period);
    url.searchParams.delete("since");
    url.searchParams.delete("until");
    window.history.pushState(null, "", url);
    load(url);
  });

  window.addEventListener("popstate", () => load(window.location.href));

  const seconds = Number(document.querySelector("main")?.dataset.refreshSeconds) || 30;
  window.setInterval(() => {
    if (document.visibilityState === "visible") load(window.location.href);
  }, seconds * 1000);
})();

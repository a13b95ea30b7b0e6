// Refreshes the page's live part (#live) every data-refresh-s seconds: the same page fetched
// again and its #live swapped in, so the page stays where it is scrolled to.
"use strict";
const REFRESH_MS = 1000 * Number(document.currentScript.dataset.refreshS);

async function refresh() {
  try {
    const response = await fetch(location.href, { cache: "no-store", credentials: "same-origin" });
    if (response.ok) {
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("live");
      const live = document.getElementById("live");
      if (fresh && live) {
        live.replaceWith(document.adoptNode(fresh));
        document.getElementById("refreshed").textContent = page.getElementById("refreshed").textContent;
      }
    }
  } catch (error) {
    // The node restarting or the network gone: try again at the next tick.
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

setTimeout(refresh, REFRESH_MS);

// Live updates: fetch the page's live part every second and swap it in (no reload).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  const note = document.getElementById("updated");
  if (!live) return;
  let busy = false;
  setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const resp = await fetch("/operator/live", {credentials: "same-origin", cache: "no-store"});
      if (resp.status === 401) { window.location.assign("/operator/login"); return; }
      if (resp.ok) { live.innerHTML = await resp.text(); note.textContent = ""; }
      else note.textContent = "Live update failed (" + resp.status + "); retrying.";
    } catch (err) {
      note.textContent = "Coordinator unreachable; retrying.";
    } finally { busy = false; }
  }, 1000);
});

// Small progressive enhancements; every page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("ask-form");
  if (form) {
    form.addEventListener("submit", () => {
      const button = document.getElementById("ask");
      button.disabled = true;
      document.getElementById("ask-status").textContent = "Asking the cloud (encrypted)…";
    });
  }
});

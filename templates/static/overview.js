// r1nest overview page: copy buttons, key reveal, readiness refresh.
// Loaded as a file (the served page has a strict CSP, no inline script) or inlined in a
// standalone file. No dependencies, no network except this origin's /health.
"use strict";

(function () {
  var root = document.getElementById("overview");
  if (!root) return;

  // The text of an element as it must be copied: masks removed, the real key kept.
  function copyText(element) {
    var clone = element.cloneNode(true);
    var masks = clone.querySelectorAll(".key-mask");
    for (var i = 0; i < masks.length; i++) masks[i].remove();
    return clone.textContent;
  }

  // navigator.clipboard exists only in secure contexts (https, localhost, file://); a gateway
  // reached over plain http on an IP falls back to a selected textarea and execCommand.
  function writeClipboard(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    return new Promise(function (resolve, reject) {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "offscreen";
      document.body.appendChild(area);
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      area.remove();
      if (ok) resolve(); else reject(new Error("copy refused"));
    });
  }

  function flash(button, label) {
    var original = button.getAttribute("data-label") || button.textContent;
    button.setAttribute("data-label", original);
    button.textContent = label;
    button.classList.toggle("copied", label === "Copied");
    window.setTimeout(function () {
      button.textContent = original;
      button.classList.remove("copied");
    }, 1500);
  }

  root.addEventListener("click", function (event) {
    var button = event.target.closest("button");
    if (!button || !root.contains(button)) return;
    var target = button.getAttribute("data-copy");
    if (target) {
      var element = document.getElementById(target);
      if (!element) return;
      writeClipboard(copyText(element)).then(
        function () { flash(button, "Copied"); },
        function () { flash(button, "Copy failed"); }
      );
      return;
    }
    if (button.hasAttribute("data-reveal")) {
      var visible = root.getAttribute("data-key-visible") === "true";
      root.setAttribute("data-key-visible", visible ? "false" : "true");
      button.textContent = visible ? "Reveal" : "Hide";
      button.setAttribute("aria-pressed", visible ? "false" : "true");
    }
  });

  // While the engine warms up, ask this origin's /health every few seconds (bounded) and
  // reload once it is ready, so the page never claims "ready" on stale data.
  var badge = document.getElementById("readiness");
  var healthUrl = root.getAttribute("data-health-url");
  if (badge && healthUrl && badge.getAttribute("data-phase") !== "ready" && window.fetch) {
    var polls = 0;
    var timer = window.setInterval(function () {
      polls += 1;
      if (polls > 120) { window.clearInterval(timer); return; }
      fetch(healthUrl, { cache: "no-store", credentials: "omit" })
        .then(function (response) { return response.text(); })
        .then(function (body) {
          var ready = false;
          try {
            var data = JSON.parse(body);
            ready = data.status === "ready" || data.phase === "ready";
          } catch (e) {
            ready = /^\s*ready\b/i.test(body);
          }
          if (ready) {
            window.clearInterval(timer);
            window.location.reload();
          }
        })
        .catch(function () { /* keep polling until the bound */ });
    }, 5000);
  }
})();

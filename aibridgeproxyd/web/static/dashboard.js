// aibridgeproxyd dashboard: the only script of the pages (the Content-Security-Policy forbids
// inline script). Every page works without it; it only saves a click.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // The provider type chooser of "Add provider": show the chosen type's fields at once.
  document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });
  // A clicked switch shows its new state while its form is sent.
  document.querySelectorAll("form.switch-form").forEach(function (form) {
    form.addEventListener("submit", function () {
      var button = form.querySelector("button.switch");
      if (button) { button.classList.toggle("on"); button.setAttribute("aria-busy", "true"); }
    });
  });
});

// Draws each chart the page carries (a Vega-Lite spec in a JSON script tag) into its slot.
// The tables beside the charts hold the same numbers, so the page reads without this.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll('script[type="application/json"][data-chart]').forEach(function (tag) {
    var slot = document.getElementById(tag.dataset.chart);
    if (!slot || typeof vegaEmbed !== "function") return;
    vegaEmbed(slot, JSON.parse(tag.textContent), { actions: false, renderer: "svg" })
      .then(function () { slot.dataset.drawn = "yes"; })
      .catch(function (err) { slot.textContent = "chart not drawn: " + err; });
  });
});

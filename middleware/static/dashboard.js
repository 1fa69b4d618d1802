// wattspan dashboard: fetch /api/data every few seconds, draw with plotly.js.
// Every text set here goes through textContent (never innerHTML): ledger values
// (routes, tenants) are untrusted.
"use strict";

(function () {
  const body = document.body;
  const REFRESH_MS = parseInt(body.dataset.refreshMs, 10) || 2000;
  const state = { window: parseFloat(body.dataset.windowS) || 3600, by: "route", metric: "total_j", last: null, timer: null };
  const $ = (id) => document.getElementById(id);
  const NAMES = { route: "endpoint", model: "model", tenant: "tenant" };

  function fmt(x, digits) {
    if (x === null || x === undefined || !isFinite(x)) return "-";
    if (x === 0) return "0";
    digits = digits || 4;
    const a = Math.abs(x);
    if (a >= 1e-4 && a < 1e9) {
      const d = Math.max(0, digits - 1 - Math.floor(Math.log10(a)));
      return x.toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d });
    }
    return x.toExponential(digits - 1);
  }
  function setv(id, value, unit) {
    const el = $(id);
    el.dataset.value = value === null || value === undefined ? "" : String(value);
    el.textContent = (Number.isInteger(value) && !unit ? value.toLocaleString("en-US") : fmt(value)) + (unit && value !== null && value !== undefined ? " " + unit : "");
  }
  function text(id, s) { $(id).textContent = s; }
  function el(tag, txt, cls) {
    const e = document.createElement(tag);
    if (txt !== undefined) e.textContent = txt;
    if (cls) e.className = cls;
    return e;
  }
  function ago(t, now) {
    if (!t) return "-";
    const s = Math.max(0, now - t);
    return s < 90 ? fmt(s, 2) + " s ago" : s < 5400 ? fmt(s / 60, 2) + " min ago" : fmt(s / 3600, 2) + " h ago";
  }

  function table(id, rows) {
    const t = $(id);
    t.replaceChildren();
    const head = el("tr");
    ["name", "requests", "J", "J / req", "J / token", "gCO2e"].forEach((h) => head.appendChild(el("th", h)));
    t.appendChild(head);
    if (!rows.length) { const r = el("tr"); const c = el("td", "no requests in the window"); c.colSpan = 6; r.appendChild(c); t.appendChild(r); return; }
    rows.slice(0, 12).forEach((r) => {
      const tr = el("tr");
      tr.dataset.name = r.name;
      const cells = [[r.name, null], [r.requests, "requests"], [r.total_j, "total_j"], [r.j_per_request, "j_per_request"], [r.j_per_token, "j_per_token"], [r.co2e_g, "co2e_g"]];
      cells.forEach(([v, key], i) => {
        const td = el("td", i === 0 ? v + (r.simulated ? " (sim)" : "") : key === "requests" ? String(v) : fmt(v));
        if (key) { td.dataset.key = key; td.dataset.value = v === null ? "" : String(v); }
        tr.appendChild(td);
      });
      t.appendChild(tr);
    });
    if (rows.length > 12) { const r = el("tr"); const c = el("td", "... " + (rows.length - 12) + " more"); c.colSpan = 6; r.appendChild(c); t.appendChild(r); }
  }

  function budgets(b) {
    const box = $("budgets");
    box.replaceChildren();
    if (!b.available) { box.appendChild(el("div", b.note || "no budgets configured", "muted")); box.dataset.state = "none"; return; }
    box.dataset.state = "some";
    b.rows.forEach((r) => {
      const used = r.used ?? r.spent ?? r.used_g ?? r.spent_g ?? 0;
      const limit = r.limit ?? r.limit_g ?? r.budget ?? null;
      const frac = r.fraction ?? (limit ? used / limit : null);
      const line = el("div", (r.name || r.scope || "budget") + ": " + fmt(used) + (limit !== null ? " of " + fmt(limit) : "") + " " + (r.unit || "") + (frac !== null ? " (" + fmt(frac * 100, 3) + "%)" : ""));
      line.className = "budget";
      box.appendChild(line);
      const bar = el("div", undefined, "bar" + (frac > 1 ? " over" : ""));
      const fill = el("div");
      fill.style.width = Math.min(100, Math.max(0, (frac || 0) * 100)) + "%";
      bar.appendChild(fill);
      box.appendChild(bar);
    });
  }

  function quality(q, totals) {
    const box = $("quality");
    box.replaceChildren();
    const n = totals.requests || 0;
    const add = (label, bad) => box.appendChild(el("span", label, "flag" + (bad ? " bad" : "")));
    add("simulated: " + q.simulated_requests + " of " + n, q.simulated_requests > 0);
    add("coverage < 90%: " + q.low_coverage_requests, q.low_coverage_requests > 0);
    Object.entries(q.methods).forEach(([m, c]) => add("method " + (m || "(none)") + ": " + c, false));
    Object.entries(q.flags || {}).forEach(([m, c]) => add("quality " + m + ": " + c, m !== "ok"));
    if (q.excluded_records) add("left out (a value no writer stores): " + q.excluded_records, true);
    if (q.band_j) add("energy band " + fmt(q.band_j[0]) + " to " + fmt(q.band_j[1]) + " J", false);
    q.sensors.forEach((s) => box.appendChild(el("div", s.device + ": " + s.sensor + (s.simulated ? " (not a measurement)" : ""), "muted")));
  }

  function charts(d) {
    const by = state.by, metric = state.metric;
    const unit = metric === "co2e_g" ? "gCO2e" : "J";
    const ser = d.series[by] || {};
    const t = d.series.t.map((x) => new Date(x * 1000));
    const traces = Object.entries(ser).map(([name, s]) => ({ type: "bar", name: name, x: t, y: s[metric], hovertemplate: "%{y:.4g} " + unit + "<extra>" + name + "</extra>" }));
    text("time-title", (metric === "co2e_g" ? "CO2e" : "energy") + " per " + fmt(d.series.bucket_s, 3) + " s, by " + NAMES[by]);
    Plotly.react("chart-time", traces, {
      barmode: "stack", margin: { l: 55, r: 10, t: 6, b: 36 }, legend: { orientation: "h", y: -0.2 }, showlegend: true,
      yaxis: { title: { text: unit }, rangemode: "tozero" }, xaxis: { type: "date" }, bargap: 0.05, uirevision: by + metric,
    }, { displayModeBar: false, responsive: true });
    const rows = (d.by[by] || []).slice(0, 12);
    text("share-title", (metric === "co2e_g" ? "CO2e" : "energy") + " by " + NAMES[by]);
    Plotly.react("chart-share", [{ type: "bar", orientation: "h", y: rows.map((r) => r.name).reverse(), x: rows.map((r) => r[metric]).reverse(),
      marker: { color: "#2f6fdf" }, hovertemplate: "%{x:.4g} " + unit + "<extra></extra>" }],
    { margin: { l: 120, r: 10, t: 6, b: 36 }, xaxis: { title: { text: unit }, rangemode: "tozero" }, yaxis: { automargin: true } },
    { displayModeBar: false, responsive: true });
  }

  function render(d) {
    const T = d.totals;
    setv("t-requests", T.requests);
    setv("t-energy", T.total_j, "J");
    text("t-energy-split", "accelerator " + fmt(T.energy_j) + " J + host " + fmt(T.host_j) + " J = " + fmt(T.total_j / 3600, 3) + " Wh");
    setv("t-co2e", T.co2e_g, "g");
    text("t-co2e-split", "embodied " + fmt(T.embodied_g) + " g included");
    setv("t-jpt", T.j_per_token, "J");
    text("t-jpot", T.j_per_output_token === null ? "no tokens recorded" : fmt(T.j_per_output_token) + " J per output token; " + (T.prompt_tokens + T.output_tokens) + " tokens");
    const U = d.unattributed;
    if (U.available) {
      const un = Object.values(U.unattributed_j).reduce((a, b) => a + b, 0);
      const me = Object.values(U.measured_j).reduce((a, b) => a + b, 0);
      setv("t-unattributed", un, "J");
      text("t-unattributed-note", "of " + fmt(me) + " J measured (" + (me > 0 ? fmt(100 * un / me, 3) : "-") + "%), " + U.note);
    } else {
      setv("t-unattributed", null);
      text("t-unattributed-note", U.note);
    }
    text("t-last", ago(T.last_record_at, d.now));
    text("t-ledger", d.ledger + ", last " + fmt(d.window_s / 60, 3) + " min");
    const banner = $("banner");
    if (d.quality.simulated_requests > 0) {
      banner.hidden = false;
      banner.textContent = d.quality.simulated_requests + " of " + T.requests + " requests rest on SIMULATED or ESTIMATED power, not a measurement.";
    } else banner.hidden = true;
    ["route", "model", "tenant"].forEach((b) => table("tbl-" + b, d.by[b] || []));
    budgets(d.budgets);
    quality(d.quality, T);
    if (window.Plotly) charts(d);
    body.dataset.updatedAt = String(d.now);
    body.dataset.requests = String(T.requests);
  }

  async function refresh() {
    try {
      const r = await fetch("api/data?window=" + encodeURIComponent(state.window), { credentials: "same-origin", cache: "no-store" });
      const d = await r.json();
      if (!r.ok) throw new Error(d.error || r.statusText);
      state.last = d;
      render(d);
      text("status", "updated " + new Date(d.now * 1000).toLocaleTimeString());
      $("status").dataset.ok = "1";
    } catch (e) {
      text("status", "cannot update: " + e.message);
      $("status").dataset.ok = "0";
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = setTimeout(async () => { await refresh(); schedule(); }, REFRESH_MS);
  }

  const sel = $("window");
  if (![...sel.options].some((o) => parseFloat(o.value) === state.window)) sel.appendChild(new Option(fmt(state.window, 3) + " s", String(state.window)));
  sel.value = [...sel.options].find((o) => parseFloat(o.value) === state.window).value;
  sel.addEventListener("change", () => { state.window = parseFloat(sel.value); refresh(); });
  $("by").addEventListener("change", (e) => { state.by = e.target.value; if (state.last) charts(state.last); });
  $("metric").addEventListener("change", (e) => { state.metric = e.target.value; if (state.last) charts(state.last); });
  refresh().then(schedule);
})();

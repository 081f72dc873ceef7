// The status page: polls /api/status and redraws the cards, tables and charts (uPlot, shipped with the page).
"use strict";
(function () {
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
  const $ = (id) => document.getElementById(id);
  let pollMs = 1000, charts = {}, lastOk = 0;

  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (typeof x !== "number") return String(x);
    if (digits !== undefined) return x.toFixed(digits);
    if (Math.abs(x) >= 1e12) return (x / 1e12).toFixed(2) + " T";
    if (Math.abs(x) >= 1e9) return (x / 1e9).toFixed(2) + " G";
    if (Math.abs(x) >= 1e6) return (x / 1e6).toFixed(2) + " M";
    if (Math.abs(x) >= 1e4) return (x / 1e3).toFixed(1) + " k";
    return Number.isInteger(x) ? String(x) : x.toFixed(2);
  }
  function short(id) { return id ? (id.length > 16 ? id.slice(0, 8) + "…" + id.slice(-6) : id) : "–"; }
  function cell(text, cls, title) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    if (title) td.title = title;
    return td;
  }
  function fillRows(tbody, rows) {
    tbody.replaceChildren(...rows.map((cells) => { const tr = document.createElement("tr"); tr.append(...cells); return tr; }));
  }

  function renderModel(m) {
    const rows = [["name", m.name], ["model id", m.model_id], ["spec hash", m.spec_hash], ["stages", m.stages],
                  ["parameters", m.params === null ? null : fmt(m.params)]];
    const t = m.terms;
    if (t) {
      rows.push(["epoch length (steps)", t.epoch_length], ["audit rate", t.audit_rate === undefined ? null : t.audit_rate],
                ["challenge window (s)", t.challenge_window_s], ["inference fee (wei)", t.inference_fee_wei],
                ["status", t.status], ["revenue deposited (wei)", t.revenue_deposited_wei], ["total shares", t.total_shares]);
    } else {
      rows.push(["terms", "off chain (no terms, receipts or shares)"]);
    }
    fillRows($("model"), rows.filter((r) => r[1] !== undefined).map(([k, v]) => [cell(k, "text"),
      cell(v === null ? "–" : String(v), k === "spec hash" ? "text mono" : "text")]));
  }

  function renderStages(stages) {
    fillRows($("stages").tBodies[0], stages.map((s) => [cell(String(s.stage)),
      cell(s.peers.length ? s.peers.map(short).join(", ") : "none", "text mono", s.peers.join("\n")),
      cell(fmt(s.tokens_per_s, 0)), cell(s.reachability === null ? "–" : String(s.reachability), "text")]));
  }

  function renderNodes(nodes) {
    fillRows($("nodes").tBodies[0], nodes.map((n) => {
      const tr = [cell(fmt(n.stage)), cell(short(n.peer_id), "text mono", n.peer_id || ""),
        cell(short(n.address), "text mono", n.address || ""), cell(n.state || "–", "text"),
        cell(n.step === null || n.step === undefined ? "–" : String(n.step + 1)), cell(fmt(n.loss, 4)),
        cell(fmt(n.val_loss, 4)),
        cell(fmt(n.tokens_per_s, 0)), cell(fmt(n.receipts_cosigned)), cell(fmt(n.receipts_pending)),
        cell(n.compute_units === null ? "–" : fmt(n.compute_units) + " FLOP"), cell(fmt(n.shares)),
        cell(n.fraction === null || n.fraction === undefined ? "–" : (100 * n.fraction).toFixed(2) + " %"),
        cell(fmt(n.claimable_wei))];
      tr.forEach((td) => td.dataset.stage = String(n.stage));
      return tr;
    }));
  }

  // One chart per kind; x = step. Series: every stage's curve of that kind (loss: only stages that report one).
  function chartData(series, key) {
    const withData = series.filter((s) => s[key].some((v) => v !== null));
    const steps = Array.from(new Set(withData.flatMap((s) => s.step))).filter((x) => x !== null).sort((a, b) => a - b);
    const ys = withData.map((s) => {
      const at = new Map(s.step.map((st, i) => [st, s[key][i]]));
      return steps.map((st) => (at.has(st) ? at.get(st) : null));
    });
    return { labels: withData.map((s) => "stage " + s.stage), data: [steps, ...ys] };
  }

  function drawChart(id, parts, yLabel) {
    const el = $(id);
    const names = parts.map((p) => p.label).join("|");
    const data = [parts.length ? parts[0].x : []].concat(parts.map((p) => p.y));
    if (!charts[id] || charts[id].names !== names) {
      if (charts[id]) charts[id].plot.destroy();
      const series = [{ label: "step" }].concat(parts.map((p, i) => ({ label: p.label, stroke: COLORS[i % COLORS.length],
        width: 2, dash: p.dash, spanGaps: true, points: p.points ? { show: true, size: 6 } : undefined })));
      const plot = new uPlot({ width: Math.max(el.clientWidth - 4, 320), height: 240, series: series,
        axes: [{ label: "step" }, { label: yLabel }], scales: { x: { time: false } } }, data, el);
      charts[id] = { plot: plot, names: names };
    } else {
      charts[id].plot.setData(data);
    }
  }

  function renderCharts(series) {
    const loss = chartData(series, "loss"), val = chartData(series, "val_loss"), tps = chartData(series, "tokens_per_s");
    const steps = Array.from(new Set(loss.data[0].concat(val.data[0]))).sort((a, b) => a - b);
    const align = (cd, i) => { const at = new Map(cd.data[0].map((s, j) => [s, cd.data[i + 1][j]]));
      return steps.map((s) => (at.has(s) ? at.get(s) : null)); };
    const lossParts = loss.labels.map((l, i) => ({ label: "train " + l, x: steps, y: align(loss, i) }))
      .concat(val.labels.map((l, i) => ({ label: "validation " + l, x: steps, y: align(val, i), dash: [6, 4], points: true })));
    drawChart("loss-chart", lossParts, "loss");
    drawChart("tps-chart", tps.labels.map((l, i) => ({ label: l, x: tps.data[0], y: tps.data[i + 1] })), "tokens/s");
  }

  function render(s) {
    $("title").textContent = s.title || "Protocol Model Network";
    document.title = (s.title || "PMN") + " — status";
    const steps = s.nodes.map((n) => n.step).filter((x) => typeof x === "number");
    const losses = s.nodes.filter((n) => typeof n.loss === "number");
    const tail = losses.sort((a, b) => b.stage - a.stage)[0];
    $("step").textContent = steps.length ? String(Math.max(...steps) + 1) : "–";
    const totals = s.nodes.map((n) => n.steps_total).filter((x) => typeof x === "number");
    $("step-of").textContent = totals.length ? "of " + Math.max(...totals) : "";
    $("loss").textContent = tail ? tail.loss.toFixed(4) : "–";
    const vals = s.nodes.filter((n) => typeof n.val_loss === "number").sort((a, b) => b.stage - a.stage);
    $("val-loss").textContent = vals.length ? vals[0].val_loss.toFixed(4) : "–";
    $("tokens").textContent = fmt(s.stages.reduce((a, st) => a + (st.tokens_per_s || 0), 0), 0);
    const cos = s.nodes.reduce((a, n) => a + (n.receipts_cosigned || 0), 0);
    const pen = s.nodes.reduce((a, n) => a + (n.receipts_pending || 0), 0);
    $("receipts").textContent = fmt(cos) + " / " + fmt(pen);
    renderModel(s.model);
    renderStages(s.stages);
    renderNodes(s.nodes);
    renderCharts(s.series);
  }

  async function poll() {
    try {
      const r = await fetch("/api/status", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const s = await r.json();
      pollMs = Math.max(200, 1000 * (s.poll_s || 1));
      render(s);
      lastOk = Date.now();
      $("live-dot").className = "dot ok";
      $("updated").textContent = "live · updated " + new Date().toLocaleTimeString();
    } catch (e) {
      $("live-dot").className = "dot stale";
      $("updated").textContent = "no answer (" + e.message + ")" + (lastOk ? ", last update " +
        new Date(lastOk).toLocaleTimeString() : "");
    }
    setTimeout(poll, pollMs);
  }
  poll();
})();

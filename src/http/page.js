"use strict";
// lockjam's page: reads /api/v1/snapshot, /api/v1/events and
// /api/v1/incidents every second and draws each target's lock queues as
// trees. Every value from the server is set as text (textContent), never
// as HTML. Ages tick between refreshes from the moment each answer came.
(function () {
  var path = location.pathname;
  var m = path.match(/^(.*\/)targets\/([^\/]+)\/?$/);
  var base = m ? m[1] : path.replace(/[^\/]*$/, "");
  var only = m ? decodeURIComponent(m[2]) : null;
  var main = document.getElementById("main");
  var status = document.getElementById("status");
  var all = document.getElementById("all");
  all.href = base;
  if (!only) all.hidden = true;
  var open = {};
  var fetchedAt = 0;

  function el(tag, attrs) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }
  function txt(v, fallback) { return v === null || v === undefined || v === "" ? (fallback || "?") : String(v); }
  function secs(v) { return v === null || v === undefined ? "?" : v.toFixed(1) + " s"; }
  // An age that ticks: `sign` +1 grows, -1 counts down to 0.
  function tick(seconds, sign, cls) {
    if (seconds === null || seconds === undefined) return el("span", { text: "?" });
    return el("span", { cls: "num " + (cls || ""), "data-tick": String(seconds), "data-sign": String(sign || 1), text: secs(seconds) });
  }
  function query(text, key) {
    if (!text) return null;
    var d = el("details", { cls: "query", "data-key": key });
    if (open[key]) d.open = true;
    d.appendChild(el("summary", { text: text.length > 140 ? text.slice(0, 140) + "…" : text }));
    d.appendChild(el("pre", { text: text }));
    d.addEventListener("toggle", function () { open[key] = d.open; });
    return d;
  }
  function who(s) {
    var parts = [txt(s.usename) + "@" + txt(s.datname)];
    if (s.application_name) parts.push(s.application_name);
    if (s.client_addr) parts.push("from " + s.client_addr);
    return parts.join(" ");
  }
  function state(s) {
    var t = txt(s.state);
    if (s.wait_event_type) t += ", waits on " + s.wait_event_type + ":" + txt(s.wait_event);
    return t;
  }

  function rootItem(r, t) {
    if (r.pid === 0) {
      return el("li", { cls: "s root", "data-pid": "0" },
        el("div", { cls: "line" }, el("span", { cls: "role", text: "ROOT" }),
          " pid 0: a prepared transaction, with no session to cancel; `lockjam preflight --relation` or pg_prepared_xacts names it, and COMMIT PREPARED or ROLLBACK PREPARED ends it"));
    }
    return el("li", { cls: "s root", "data-pid": String(r.pid) },
      el("div", { cls: "line" },
        el("span", { cls: "role", text: "ROOT" }), " pid ",
        el("span", { cls: "who pid", text: String(r.pid) }), " ",
        el("span", { cls: "who", text: who(r) }), " · " + state(r) + " · holds " + txt(r.holds) + " on " + txt(r.holds_on) + " · transaction ",
        tick(r.transaction_age_seconds, 1)),
      query(r.query, t + "/r" + r.pid));
  }
  function nodeItem(n, t, role) {
    var li = el("li", { cls: "s " + role, "data-pid": String(n.pid) },
      el("div", { cls: "line" },
        el("span", { cls: "role", text: role === "head" ? "HEAD" : "WAITS" }), " pid ",
        el("span", { cls: "who pid", text: String(n.pid) }), " ",
        el("span", { cls: "who", text: who(n) }), " · waits ",
        tick(n.wait_seconds, 1, role === "head" ? "head-wait" : ""),
        " for " + n.mode + " on " + n.relation + (n.behind > 0 ? " · " + n.behind + " behind" : "") + " · transaction ",
        tick(n.transaction_age_seconds, 1)),
      query(n.query, t + "/w" + n.pid));
    if (n.children && n.children.length) li.appendChild(children(n.children, t));
    return li;
  }
  function children(list, t) {
    var ul = el("ul", { cls: "q" });
    list.forEach(function (c) {
      if (c.kind === "session") { ul.appendChild(nodeItem(c, t, "behind")); return; }
      var what = c.query === null ? "more sessions" : c.query;
      var from = c.query === null ? "" : " from " + txt(c.application_name) + " (" + txt(c.usename) + ") · " + txt(c.mode);
      ul.appendChild(el("li", { cls: "s behind group" },
        el("div", { cls: "line" },
          el("span", { cls: "role", text: "WAIT" }), " ",
          el("span", { cls: "who count", text: c.count + " ×" }), " ",
          el("code", { text: what.length > 140 ? what.slice(0, 140) + "…" : what }),
          from + " · waits ", tick(c.wait_seconds_min, 1), "–", tick(c.wait_seconds_max, 1),
          " · pids " + c.pids.join(", ") + (c.count > c.pids.length ? ", …" : ""))));
    });
    return ul;
  }
  function treeView(t, target, i) {
    var key = target + "/" + i;
    var box = el("div", { cls: "tree" },
      el("h3", { text: "database " + t.datname + " · " + t.relation + " · " + t.mode + " wanted · " }, 
        el("span", { cls: "num depth", text: t.blocked + " blocked" }), ", chain depth " + t.depth));
    if (t.deadlock) box.appendChild(el("p", { cls: "down", text: "Deadlock: these sessions wait on each other; PostgreSQL ends one after deadlock_timeout." }));
    var ul = el("ul", { cls: "q top" });
    t.roots.forEach(function (r) { ul.appendChild(rootItem(r, key)); });
    var inner = el("ul", { cls: "q" });
    inner.appendChild(nodeItem(t.waiter, key, "head"));
    ul.appendChild(el("li", { cls: "s" }, inner));
    box.appendChild(ul);
    if (t.next) {
      box.appendChild(el("p", { cls: "next" }, "Policy: rule " + t.next.rule + " " + t.next.action +
        (t.next.dry_run ? " (dry run: logs only)" : "") + " on pid " + t.next.waiter_pid + "'s wait ",
        t.next.due_in_seconds > 0 ? el("span", {}, "in ", tick(t.next.due_in_seconds, -1)) : "now",
        t.next.withheld ? ": withheld, " + t.next.withheld + "; it reports and the queue stays" : ""));
    }
    return box;
  }
  function policyLine(p) {
    var cls = p.mode === "live" ? "live" : p.mode === "dry run" ? "dry" : "off";
    var lead = p.leader === true ? ", this instance leads" : p.leader === false ? ", another instance leads" : "";
    var span = el("span", { cls: "meta" }, "policy ", el("span", { cls: "badge policy " + cls, text: p.mode }), lead);
    return span;
  }
  function targetView(t, events, incidents) {
    var sec = el("section", { cls: "target", "data-target": t.target });
    sec.appendChild(el("h2", {},
      el("a", { href: base + "targets/" + encodeURIComponent(t.target), text: t.target }),
      el("span", { cls: "badge " + (t.up ? "up" : "down"), text: t.up ? "up" : "down" }),
      el("span", { cls: "meta", text: t.server_version ? "PostgreSQL " + Math.floor(t.server_version / 10000) + "." + (t.server_version % 10000) : "" }),
      el("span", { cls: "meta", text: t.taken_at ? "sampled " + t.taken_at.replace("T", " ").replace("Z", " UTC") : "" }),
      policyLine(t.policy)));
    if (t.error) sec.appendChild(el("p", { cls: "down", text: "Not sampled: " + t.error }));
    t.warnings.forEach(function (w) { sec.appendChild(el("p", { cls: "warn", text: "Warning: " + w })); });
    if (t.up && t.trees.length === 0) {
      sec.appendChild(el("p", { cls: "calm", text: "Calm: no session waits for a lock (" + t.sessions + " sessions)." }));
    }
    t.trees.forEach(function (tree, i) { sec.appendChild(treeView(tree, t.target, i)); });
    var stuck = {};
    t.waiters.forEach(function (w) { if (w.relation) stuck[w.datname + " · " + w.relation] = (stuck[w.datname + " · " + w.relation] || 0) + 1; });
    var names = Object.keys(stuck).sort(function (a, b) { return stuck[b] - stuck[a]; });
    if (names.length) {
      sec.appendChild(el("p", { cls: "stuck meta", text: "Stuck relations: " + names.map(function (n) { return n + " (" + stuck[n] + " waiting)"; }).join(", ") }));
    }
    if (t.policy.rules.length) {
      var d = el("details", { "data-key": t.target + "/rules" }, el("summary", { cls: "meta", text: t.policy.rules.length + " rule(s)" }));
      if (open[t.target + "/rules"]) d.open = true;
      d.addEventListener("toggle", function () { open[t.target + "/rules"] = d.open; });
      t.policy.rules.forEach(function (r) { d.appendChild(el("p", { cls: "meta", text: r })); });
      sec.appendChild(d);
    }
    var mine = events.filter(function (e) { return e.target === t.target; }).slice(0, 5);
    if (mine.length) {
      sec.appendChild(el("h4", { text: "What lockjam did" }));
      var tb = el("tbody");
      mine.forEach(function (e) {
        tb.appendChild(el("tr", { cls: "event" }, el("td", { text: e.time }), el("td", { text: e.rule }),
          el("td", { text: e.action + " pid " + e.signalled_pid }), el("td", { text: e.outcome }), el("td", { text: e.reason })));
      });
      sec.appendChild(el("div", { cls: "scroll" }, el("table", {}, tb)));
    }
    if (only) {
      sec.appendChild(el("h4", { text: "Last incidents" }));
      if (!incidents.length) sec.appendChild(el("p", { cls: "meta", text: "None recorded." }));
      else sec.appendChild(incidentTable(incidents));
    }
    return sec;
  }
  function incidentTable(list) {
    var head = el("tr", {});
    ["closed", "target · database · relation", "mode", "lasted", "outcome", "roots", "peak behind", ""].forEach(function (h) { head.appendChild(el("th", { text: h })); });
    var tb = el("tbody", {}, head);
    list.forEach(function (i) {
      var key = "incident/" + i.id;
      var d = el("details", { "data-key": key }, el("summary", { text: "detail" }));
      if (open[key]) d.open = true;
      d.addEventListener("toggle", function () { open[key] = d.open; });
      d.appendChild(el("p", { text: "waiter pid " + i.waiter.pid + " " + who(i.waiter) }));
      d.appendChild(el("pre", { text: txt(i.waiter.query, "") }));
      i.roots.forEach(function (r) {
        d.appendChild(el("p", { text: "root pid " + r.pid + " " + who(r) + (r.holds ? " · held " + r.holds.mode : "") }));
        d.appendChild(el("pre", { text: txt(r.query, "") }));
      });
      i.decisions.forEach(function (x) { d.appendChild(el("p", { text: x.time + " " + x.rule + ": " + x.action + " pid " + x.signalled_pid + " → " + x.outcome })); });
      tb.appendChild(el("tr", { cls: "incident" },
        el("td", { text: i.closed_at }), el("td", { text: i.target + " · " + i.datname + " · " + i.relation }), el("td", { text: i.mode }),
        el("td", { cls: "num", text: secs(i.duration_seconds) }), el("td", { text: i.outcome }),
        el("td", { text: i.roots.map(function (r) { return r.pid + " " + txt(r.application_name, ""); }).join(", ") }),
        el("td", { cls: "num", text: String(i.peak_behind) }), el("td", {}, d)));
    });
    return el("div", { cls: "scroll" }, el("table", {}, tb));
  }

  function get(what) {
    return fetch(base + what, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error(what + ": HTTP " + r.status);
      return r.json();
    });
  }
  function refresh() {
    var q = only ? "&target=" + encodeURIComponent(only) : "";
    Promise.all([get("api/v1/snapshot"), get("api/v1/events"), get("api/v1/incidents?limit=10" + q)]).then(function (answers) {
      var targets = answers[0].targets.filter(function (t) { return !only || t.target === only; });
      var frag = document.createDocumentFragment();
      if (!targets.length) frag.appendChild(el("p", { cls: "down", text: only ? "lockjam has no target named " + only + "." : "lockjam has no targets." }));
      targets.forEach(function (t) { frag.appendChild(targetView(t, answers[1].events, answers[2].incidents)); });
      if (!only) {
        // Every target's, newest first: one list, so that a busy target's
        // incidents do not hide a quiet one's.
        var all = el("section", { cls: "target incidents" }, el("h4", { text: "Last incidents, all targets" }));
        if (!answers[2].incidents.length) all.appendChild(el("p", { cls: "meta", text: "None recorded." }));
        else all.appendChild(incidentTable(answers[2].incidents));
        frag.appendChild(all);
      }
      main.replaceChildren(frag);
      fetchedAt = Date.now();
      var waiting = targets.reduce(function (n, t) { return n + t.waiters.length; }, 0);
      var down = targets.filter(function (t) { return !t.up; }).length;
      var parts = [targets.length + " target(s)"];
      if (down) parts.push(down + " down");
      parts.push(waiting ? waiting + " session(s) waiting for a lock" : (down ? "no lock waits seen" : "calm"));
      status.textContent = parts.join(" · ") + " · updated " + new Date().toLocaleTimeString();
    }).catch(function (e) {
      status.textContent = "cannot reach lockjam (" + e.message + "); showing the last answer";
    }).then(function () { setTimeout(refresh, 1000); });
  }
  setInterval(function () {
    var gone = (Date.now() - fetchedAt) / 1000;
    var ticking = main.querySelectorAll("[data-tick]");
    for (var i = 0; i < ticking.length; i++) {
      var n = ticking[i];
      var v = parseFloat(n.getAttribute("data-tick")) + gone * parseFloat(n.getAttribute("data-sign"));
      n.textContent = secs(Math.max(v, 0));
    }
  }, 250);
  refresh();
})();

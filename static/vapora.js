// Vapora's live client: keeps a workflow page, or the list page, in step with
// the server. Text goes into the page with textContent only, never as HTML.
(function () {
  "use strict";

  var body = document.body;
  var page = body.dataset.page;
  if (page !== "workflow" && page !== "list") return;

  var BACKOFF_BASE_MS = 500;
  var BACKOFF_CAP_MS = 15000;
  var OFFLINE_AFTER_ATTEMPTS = 3;
  var HISTORY_ROWS = 50;
  // The server sends something at least every heartbeat; silence longer than
  // this means the link is dead (laptop sleep, a half-open connection).
  var SILENCE_MS = Number(body.dataset.silenceMs || 45000);

  var workflowId = body.dataset.workflowId || null;
  var seq = Number(body.dataset.seq || 0);
  var epoch = body.dataset.epoch || "";
  // Server time minus local time, so relative times hold when the viewer's
  // clock is wrong.
  var clockOffsetMs = body.dataset.serverNow
    ? Date.parse(body.dataset.serverNow) - Date.now()
    : 0;

  var socket = null;
  var attempt = 0;
  var retryTimer = null;
  var silenceTimer = null;
  var lostAt = null;
  var lastDataAt = Date.now();
  var transport = "websocket";
  var events = null;
  var socketFailures = 0;

  // ---- freshness: what the page says about how current it is ----

  var freshness = document.querySelector("[data-field=freshness]");

  function setFreshness(state, text, since) {
    if (!freshness) return;
    freshness.dataset.state = state;
    freshness.textContent = text;
    if (since) {
      var time = document.createElement("time");
      time.dateTime = new Date(since).toISOString();
      time.textContent = formatClock(new Date(since));
      freshness.appendChild(time);
    }
  }

  function showLive() {
    var via = transport === "sse" ? " (via fallback stream)" : "";
    setFreshness("live", "Live" + via);
  }

  function showLost() {
    if (attempt >= OFFLINE_AFTER_ATTEMPTS || navigator.onLine === false) {
      setFreshness("offline", "Offline since ", lostAt);
    } else {
      setFreshness("reconnecting", "Reconnecting… last update at ", lastDataAt);
    }
  }

  // ---- times ----

  function serverNow() {
    return Date.now() + clockOffsetMs;
  }

  function formatClock(date) {
    return date.toLocaleTimeString(undefined, {
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
    });
  }

  function formatDateTime(date) {
    return date.toLocaleString(undefined, {
      year: "numeric",
      month: "short",
      day: "numeric",
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
    });
  }

  function formatAgo(iso) {
    var seconds = Math.max(0, Math.round((serverNow() - Date.parse(iso)) / 1000));
    if (seconds < 5) return "just now";
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " d ago";
  }

  function formatDuration(ms) {
    var total = Math.max(0, Math.floor(ms / 1000));
    var h = Math.floor(total / 3600);
    var m = Math.floor((total % 3600) / 60);
    var s = total % 60;
    if (h) return h + "h " + m + "m " + s + "s";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  function renderTime(el) {
    var iso = el.getAttribute("datetime");
    if (!iso) return;
    var date = new Date(iso);
    if (el.dataset.relative === "yes") {
      el.textContent = formatAgo(iso);
      el.title = formatDateTime(date);
    } else {
      el.textContent = formatDateTime(date);
    }
  }

  function setTime(el, iso) {
    el.setAttribute("datetime", iso);
    renderTime(el);
  }

  function renderAllTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(renderTime);
  }

  function renderDurations() {
    document.querySelectorAll(".step[data-started]").forEach(function (li) {
      var started = li.dataset.started;
      var out = li.querySelector(".step-duration");
      if (!started || !out) {
        if (out) out.textContent = "";
        return;
      }
      var end = li.dataset.finished ? Date.parse(li.dataset.finished) : serverNow();
      out.textContent = formatDuration(end - Date.parse(started));
    });
  }

  // ---- applying state to the page ----

  function field(root, name) {
    return root.querySelector("[data-field=" + name + "]");
  }

  function setText(root, name, text) {
    var el = field(root, name);
    if (el && el.textContent !== String(text)) el.textContent = String(text);
  }

  function applySummary(root, state) {
    var badge = field(root, "status");
    if (badge) badge.dataset.status = state.badge_status;
    setText(root, "status_label", state.badge_label);
    setText(root, "message", state.message);
    setText(root, "step_label", state.step_label);
    setText(root, "percent", state.percent);
    setText(root, "seq", state.seq);
    var bar = field(root, "progress");
    if (bar) {
      bar.setAttribute("aria-valuenow", String(state.percent));
      bar.setAttribute("aria-valuetext", state.step_label + ", " + state.percent + "%");
      var visual = bar.querySelector("progress");
      if (visual) visual.value = state.percent;
    }
    var changed = root.querySelector(".changed time");
    if (changed) setTime(changed, state.timestamp);
  }

  function applySteps(steps) {
    var list = field(document, "steps");
    if (!list) return;
    var items = list.children;
    for (var i = 0; i < steps.length; i++) {
      var step = steps[i];
      var li = items[i];
      if (!li) {
        li = document.createElement("li");
        li.className = "step";
        ["icon", "step-name", "step-state", "step-duration", "step-note"].forEach(function (cls) {
          var span = document.createElement("span");
          span.className = cls;
          if (cls === "icon") span.setAttribute("aria-hidden", "true");
          li.appendChild(span);
        });
        list.appendChild(li);
      }
      li.dataset.state = step.state;
      li.dataset.started = step.started_at || "";
      li.dataset.finished = step.finished_at || "";
      li.querySelector(".step-name").textContent = step.name;
      li.querySelector(".step-state").textContent = step.state;
      li.querySelector(".step-note").textContent = stepNote(step);
    }
    while (list.children.length > steps.length) list.removeChild(list.lastChild);
    renderDurations();
  }

  var medians = JSON.parse(body.dataset.medians || "{}");

  function gateWho(gate) {
    return gate.approvers.length ? gate.approvers.join(", ") + " or an admin" : "an admin";
  }

  function stepNote(step) {
    if (step.gate) {
      if (!step.gate.decision) return "needs approval from " + gateWho(step.gate);
      return step.gate.decision + " by " + step.gate.decided_by + ": " + step.gate.comment;
    }
    var usual = medians[step.name];
    if (usual !== undefined) return "usually " + formatDuration(usual * 1000);
    return "";
  }

  function openGate(state) {
    var step = state.steps[state.current_step - 1];
    if (state.status !== "waiting" || !step || !step.gate || step.gate.decision) return null;
    return step;
  }

  function applyGate(state) {
    var notice = field(document, "gate");
    if (!notice) return;
    var step = openGate(state);
    notice.hidden = !step;
    notice.textContent = step
      ? "Step " + state.current_step + ", “" + step.name + "”, waits for approval from " +
        gateWho(step.gate) + "."
      : "";
  }

  // When the workflow usually ends, from how long its steps took in past runs.
  function applyEstimate(state) {
    var out = field(document, "estimate");
    if (!out || !state) return;
    var final = ["completed", "failed", "cancelled"].indexOf(state.status) >= 0;
    var remaining = 0;
    for (var i = 0; i < state.steps.length && !final; i++) {
      var step = state.steps[i];
      var usual = medians[step.name];
      if (usual === undefined) {
        final = true;
        break;
      }
      if (step.state === "running" && step.started_at) {
        remaining += Math.max(0, usual * 1000 - (serverNow() - Date.parse(step.started_at)));
      } else if (step.state === "pending") {
        remaining += usual * 1000;
      }
    }
    out.hidden = final || !Object.keys(medians).length;
    if (!out.hidden) {
      var time = out.querySelector("time");
      time.dataset.relative = "no";
      setTime(time, new Date(serverNow() + remaining).toISOString());
    }
  }

  // The tab shows the state too: in its title and its icon.
  var FAVICON_COLOURS = {
    pending: "#6b6f7c", running: "#2457c5", waiting: "#b07a00", paused: "#b07a00",
    stalled: "#b07a00", completed: "#1b7a3d", failed: "#b3261e", cancelled: "#6b6f7c",
  };

  function applyTab(state) {
    document.title = "(" + state.badge_label + ") " + state.name + " · Vapora";
    var colour = FAVICON_COLOURS[state.badge_status] || "#6b6f7c";
    var svg = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">' +
      '<circle cx="8" cy="8" r="7" fill="' + colour + '"/></svg>';
    var link = document.querySelector('link[rel="icon"]');
    if (!link) {
      link = document.createElement("link");
      link.rel = "icon";
      document.head.appendChild(link);
    }
    link.href = "data:image/svg+xml," + encodeURIComponent(svg);
  }

  // The badge as served: the first change from it is announced too, even when
  // no snapshot came first (a page resuming from the seq it was rendered at
  // is sent only the updates after it).
  var servedBadge = page === "workflow" ? field(document, "status") : null;
  var lastBadge = servedBadge ? servedBadge.dataset.status : null;

  // The tab shows the state from the start, not only after the first change.
  if (servedBadge) {
    applyTab({
      name: field(document, "name").textContent,
      badge_status: servedBadge.dataset.status,
      badge_label: field(document, "status_label").textContent,
    });
  }

  function announce(state) {
    if (lastBadge !== null && lastBadge !== state.badge_status) {
      var out = field(document, "announce");
      if (out) out.textContent = state.name + ": " + state.badge_label + ", " + state.step_label;
      notifyIfWanted(state);
    }
    lastBadge = state.badge_status;
  }

  // Browser notifications, only for people who ask for them.
  var NOTIFY_ON = ["completed", "failed", "waiting"];
  var notifyButton = field(document, "notify");

  function notifyIfWanted(state) {
    if (!window.Notification || Notification.permission !== "granted") return;
    if (NOTIFY_ON.indexOf(state.status) < 0) return;
    var title = state.name + ": " + state.badge_label;
    new Notification(title, { body: state.message || state.step_label });
  }

  if (notifyButton && window.Notification && Notification.permission !== "denied") {
    notifyButton.hidden = Notification.permission === "granted";
    notifyButton.addEventListener("click", function () {
      Notification.requestPermission().then(function (answer) {
        notifyButton.hidden = answer !== "default";
      });
    });
  }

  var current = null;

  function applyState(state) {
    current = state;
    applyGate(state);
    applyEstimate(state);
    applyTab(state);
    announce(state);
  }

  function applyPresence(frame) {
    Object.keys(frame.watching).forEach(function (id) {
      var root = page === "workflow" ? (id === workflowId ? document : null)
        : listEl.querySelector('[data-workflow-id="' + CSS.escape(id) + '"]');
      if (root) setText(root, "watching", frame.watching[id]);
    });
  }

  function historyRow(event) {
    var tr = document.createElement("tr");
    tr.dataset.seq = String(event.seq);
    var when = document.createElement("td");
    var time = document.createElement("time");
    time.dataset.relative = "no";
    setTime(time, event.at);
    when.appendChild(time);
    var who = document.createElement("td");
    who.textContent = event.actor;
    var what = document.createElement("td");
    what.textContent = event.summary;
    tr.appendChild(when);
    tr.appendChild(who);
    tr.appendChild(what);
    return tr;
  }

  function prependHistory(event) {
    var tbody = field(document, "history");
    if (!tbody) return;
    tbody.insertBefore(historyRow(event), tbody.firstChild);
    while (tbody.children.length > HISTORY_ROWS) tbody.removeChild(tbody.lastChild);
  }

  function replaceHistory(history) {
    var tbody = field(document, "history");
    if (!tbody) return;
    tbody.replaceChildren.apply(tbody, history.map(historyRow));
  }

  function applyWorkflowFrame(frame) {
    if (frame.type === "snapshot") {
      // A snapshot is the whole truth: take it even when its seq went down
      // (another database) or jumped (we missed updates).
      seq = frame.seq;
      epoch = frame.epoch;
      setText(document, "name", frame.name);
      document.title = frame.name + " · Vapora";
      applySummary(document, frame);
      applySteps(frame.steps);
      if (frame.history) replaceHistory(frame.history);
      applyState(frame);
      return;
    }
    if (frame.type !== "update" || frame.epoch !== epoch || frame.seq <= seq) return;
    seq = frame.seq;
    applySummary(document, frame);
    applySteps(frame.steps);
    prependHistory({
      seq: frame.seq, at: frame.timestamp, actor: frame.actor, summary: frame.summary,
    });
    applyState(frame);
  }

  // The list page: one item per workflow, newest activity first.

  var listEl = page === "list" ? field(document, "list") : null;
  var itemTemplate = document.getElementById("workflow-item");

  function listItem(state) {
    var li = listEl.querySelector('[data-workflow-id="' + CSS.escape(state.workflow_id) + '"]');
    if (!li) {
      li = itemTemplate.content.firstElementChild.cloneNode(true);
      li.dataset.workflowId = state.workflow_id;
      li.dataset.seq = "0";
      var link = field(li, "name");
      link.href = body.dataset.pagePrefix + encodeURIComponent(state.workflow_id);
    }
    return li;
  }

  function applyListState(state, moveToTop) {
    var li = listItem(state);
    if (Number(li.dataset.seq) >= state.seq && li.isConnected) return;
    li.dataset.seq = String(state.seq);
    setText(li, "name", state.name);
    var bar = field(li, "progress");
    if (bar) bar.setAttribute("aria-label", "Progress of " + state.name);
    applySummary(li, state);
    if (moveToTop || !li.isConnected) listEl.insertBefore(li, listEl.firstChild);
    var empty = field(document, "empty");
    if (empty) empty.hidden = true;
  }

  function applyListFrame(frame) {
    if (frame.type === "list") {
      epoch = frame.epoch;
      for (var i = frame.workflows.length - 1; i >= 0; i--) {
        applyListState(frame.workflows[i], true);
      }
      return;
    }
    if (frame.type === "update") applyListState(frame, true);
  }

  // ---- the connection ----

  function onFrame(text) {
    lastDataAt = Date.now();
    armSilenceTimer();
    var frame;
    try {
      frame = JSON.parse(text);
    } catch (err) {
      return;
    }
    if (frame.now) clockOffsetMs = Date.parse(frame.now) - Date.now();
    if (frame.heartbeat_s) SILENCE_MS = Math.max(SILENCE_MS, frame.heartbeat_s * 2500 + 2000);
    if (frame.type === "heartbeat" || frame.type === "ready") return;
    if (frame.type === "presence") return applyPresence(frame);
    if (page === "workflow") applyWorkflowFrame(frame);
    else applyListFrame(frame);
  }

  function socketUrl() {
    var url = new URL(body.dataset.socket, window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (page === "workflow") {
      url.searchParams.set("after", String(seq));
      url.searchParams.set("epoch", epoch);
    }
    return url.toString();
  }

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (socket || events) return;
    if (transport === "sse") return connectEvents();
    // A socket counts as working once a frame came through it: a proxy that
    // accepts the upgrade and then kills the connection is no better than one
    // that refuses it.
    var heard = false;
    var ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (err) {
      return onLost(false);
    }
    socket = ws;
    ws.onopen = function () {
      if (socket === ws) armSilenceTimer();
    };
    ws.onmessage = function (msg) {
      if (socket !== ws) return;
      if (!heard) {
        heard = true;
        attempt = 0;
        socketFailures = 0;
        lostAt = null;
        showLive();
      }
      onFrame(msg.data);
    };
    ws.onclose = function () {
      if (socket !== ws) return;
      socket = null;
      onLost(heard);
    };
  }

  function connectEvents() {
    var url = new URL(body.dataset.events, window.location.href);
    url.searchParams.set("after", String(seq));
    url.searchParams.set("epoch", epoch);
    var source = new EventSource(url.toString());
    events = source;
    var handler = function (msg) {
      if (events === source) onFrame(msg.data);
    };
    ["snapshot", "update", "ready", "heartbeat", "presence"].forEach(function (name) {
      source.addEventListener(name, handler);
    });
    source.onopen = function () {
      attempt = 0;
      lostAt = null;
      armSilenceTimer();
      showLive();
    };
    source.onerror = function () {
      // EventSource retries on its own from Last-Event-ID, but it would not
      // carry our epoch; reconnect ourselves with the seq we trust, trying
      // the WebSocket first again in case the network has changed.
      if (events !== source) return;
      source.close();
      events = null;
      transport = "websocket";
      socketFailures = 0;
      onLost(true);
    };
  }

  function onLost(worked) {
    clearTimeout(silenceTimer);
    if (lostAt === null) lostAt = lastDataAt;
    var fallBack = false;
    if (!worked && transport === "websocket" && page === "workflow" && body.dataset.events) {
      // A socket that fails again and again may be blocked by a proxy: try
      // Server-Sent Events, at once.
      socketFailures += 1;
      if (socketFailures >= 2) {
        transport = "sse";
        fallBack = true;
      }
    }
    attempt += 1;
    showLost();
    // Exponential backoff with full jitter, so clients do not return together.
    var ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, attempt));
    retryTimer = setTimeout(connect, fallBack ? 0 : Math.random() * ceiling);
  }

  function armSilenceTimer() {
    clearTimeout(silenceTimer);
    silenceTimer = setTimeout(function () {
      // Nothing, not even a heartbeat: the link is dead even if the
      // browser has not noticed. Drop it and reconnect.
      dropConnection();
    }, SILENCE_MS);
  }

  function dropConnection() {
    if (socket) {
      var ws = socket;
      socket = null;
      ws.onclose = null;
      ws.close();
      onLost(true);
    } else if (events) {
      events.close();
      events = null;
      onLost(true);
    }
  }

  function reconnectNow() {
    if (socket || events) {
      if (Date.now() - lastDataAt > SILENCE_MS) dropConnection();
      else return;
    }
    attempt = 0;
    connect();
  }

  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") reconnectNow();
  });
  window.addEventListener("online", reconnectNow);
  window.addEventListener("offline", function () {
    if (!socket && !events) showLost();
  });

  // For tests and curious people: the state the client holds.
  window.vapora = {
    get seq() {
      return seq;
    },
    get transport() {
      return transport;
    },
    reconnectNow: reconnectNow,
  };

  renderAllTimes(document);
  renderDurations();
  setInterval(function () {
    document.querySelectorAll('time[data-relative="yes"]').forEach(renderTime);
    renderDurations();
    if (current) applyEstimate(current);
  }, 5000);
  // Without a socket URL (a private list), the page stays as it was served.
  if (body.dataset.socket) connect();
})();

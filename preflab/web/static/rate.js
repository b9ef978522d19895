// Rater page: fetch a task from the JSON API, take a choice / strength / rationale by keys or
// clicks, submit with a per-task idempotency key (resent on retry), load the next task in place.
(function () {
  "use strict";
  const root = document.getElementById("rater");
  const roundId = root.dataset.round;
  const csrf = root.dataset.csrf;
  const minRationale = parseInt(root.dataset.minRationale, 10) || 0;
  const allowTies = root.dataset.allowTies === "true";
  const leaseMs = 1000 * (parseFloat(root.dataset.leaseS) || 900);
  // a phone has no Shift: there Enter in the rationale is a new line and the button submits
  const touch = window.matchMedia && window.matchMedia("(pointer: coarse)").matches;
  const $ = (id) => document.getElementById(id);
  const rationale = $("rationale");

  let task = null, choice = null, strength = null, shownAt = 0, key = null, busy = false, lastActive = 0;
  let recheck = null;

  function newKey() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);  // works on plain http too, unlike crypto.randomUUID
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function say(msg) { $("message").textContent = msg || ""; }

  // a notice that outlives the task it is about (shown above the next one), e.g. an answer not saved
  function notice(msg) { $("notice").textContent = msg || ""; $("notice").hidden = !msg; }

  function render() {
    document.querySelectorAll("[data-choice]").forEach((el) =>
      el.classList.toggle("selected", el.dataset.choice === choice));
    document.querySelectorAll("[data-strength]").forEach((el) => {
      el.classList.toggle("selected", choice !== "tie" && parseInt(el.dataset.strength, 10) === strength);
      el.disabled = choice === "tie";
    });
    const n = rationale.value.trim().length;
    $("count").textContent = n < minRationale ? `${n} / ${minRationale}` : `${n}`;
  }

  function progress(p) {
    const pct = p.total ? Math.round((100 * p.done) / p.total) : 0;
    $("progress-fill").style.width = pct + "%";
    $("progress-text").textContent = `${p.done} of ${p.total} done`;
  }

  async function api(method, path, body) {
    const res = await fetch(path, {
      method, credentials: "same-origin",
      headers: { "Accept": "application/json", "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body ? JSON.stringify(body) : undefined,
    });
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    return { status: res.status, data };
  }

  async function loadNext() {
    $("loading").hidden = false;
    let r = null;
    for (let attempt = 0; attempt < 4; attempt++) {  // busy server or lost connection: try again shortly
      try { r = await api("GET", `/api/v1/rounds/${roundId}/next`); } catch (e) { r = { status: 0, data: null }; }
      if (r.status !== 0 && r.status !== 409 && r.status < 500) break;
      await new Promise((ok) => setTimeout(ok, 250 * 2 ** attempt));
    }
    $("loading").hidden = true;
    if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); return; }
    if (r.status !== 200) { say((r.data && r.data.error && r.data.error.message) || `error ${r.status}`); return; }
    progress(r.data.progress);
    if (!r.data.task) {
      $("task").hidden = true; $(r.data.closed ? "closed" : "done").hidden = false;
      if (!r.data.closed) waitForMore();
      return;
    }
    task = r.data.task; choice = null; strength = null; key = newKey();  // nothing preset: a default would pass for a judgement
    $("query").textContent = task.prompt;
    $("left-text").textContent = task.left.text;
    $("right-text").textContent = task.right.text;
    rationale.value = ""; say("");
    $("task").hidden = false; $("done").hidden = true;
    shownAt = lastActive = performance.now();
    render();
    window.scrollTo(0, 0);
    rationale.blur();
  }

  // "All done" holds for now only: an item another rater left open comes back to the pool when its lease
  // lapses, and is handed out when someone asks, so the page keeps asking (quietly) while it says done
  function waitForMore() {
    clearTimeout(recheck);
    recheck = setTimeout(async () => {
      if ($("done").hidden) return;
      let r = null;
      try { r = await api("GET", `/api/v1/rounds/${roundId}/next`); } catch (e) { r = null; }
      if (r && r.status === 200 && (r.data.task || r.data.closed)) { $("done").hidden = true; loadNext(); }
      else waitForMore();
    }, Math.max(5000, Math.min(60000, leaseMs / 2)));
  }

  function choose(c) {  // the rationale box is not focused: A/S/D still set the strength, R goes there
    if (c === "tie" && !allowTies) return;
    choice = c; say(""); render();
  }

  async function submit() {
    if (!task || busy) return;
    if (!choice) { say("Choose a response first (1 or 2)."); return; }
    if (choice !== "tie" && !strength) { say("How much better? Choose Slightly, Clearly or Much better (A, S or D)."); return; }
    const text = rationale.value.trim();
    if (text.length < minRationale) { say(`The rationale needs at least ${minRationale} characters.`); rationale.focus(); return; }
    busy = true; $("submit").disabled = true; say("Saving…");
    const body = {
      assignment_id: task.assignment_id, choice, strength: choice === "tie" ? 0 : strength, rationale: text,
      time_on_task_s: (performance.now() - shownAt) / 1000, idempotency_key: key,
    };
    let r = null;
    for (let attempt = 0; attempt < 4; attempt++) {
      try {
        r = await api("POST", `/api/v1/rounds/${roundId}/judgements`, body);
        if (r.status < 500) break;
      } catch (e) { r = null; }  // network error: resend with the same idempotency key
      await new Promise((ok) => setTimeout(ok, 300 * 2 ** attempt));
    }
    busy = false; $("submit").disabled = false;
    if (r && (r.status === 200 || r.status === 201)) { say(""); notice(""); await loadNext(); return; }
    if (r && (r.status === 404 || r.status === 409)) {
      say("");
      // the lease lapsed (the item went to another rater) or it was answered elsewhere (another tab): this
      // answer cannot be saved; say so above the next item, with the rationale to copy
      const message = (r.data && r.data.error && r.data.error.message) || "";
      const why = r.status === 404
        ? "Not saved: the previous item was open longer than the round allows and went to another rater."
        : / is closed$/.test(message) ? "Not saved: an admin closed this round while you were on the item."
        : "Not saved: the previous item had already been answered (in another tab?).";
      notice(`${why} Your rationale was: “${text}”`);
      await loadNext(); return;
    }
    if (r && (r.status === 401 || r.status === 403)) {
      say("Your session has ended: sign in again in a new tab, then press Submit here again (your answer is kept).");
      return;
    }
    say(r && r.data && r.data.error ? r.data.error.message : "Could not save; check the connection and press Enter again.");
  }

  document.querySelectorAll("[data-choice]").forEach((el) => el.addEventListener("click", () => choose(el.dataset.choice)));
  document.querySelectorAll("[data-strength]").forEach((el) => el.addEventListener("click", () => {
    strength = parseInt(el.dataset.strength, 10); render();
  }));
  $("submit").addEventListener("click", submit);
  rationale.addEventListener("input", render);

  // while the rater works on an item, keep its lease (the server renews it when asked for the task in hand)
  // (reading counts: scrolling a long answer, in the page or inside a card, keeps the lease too)
  ["keydown", "click", "input", "scroll", "wheel", "touchmove"].forEach((t) => document.addEventListener(
    t, () => { lastActive = performance.now(); }, { capture: true, passive: true }));
  setInterval(async () => {
    if (!task || busy || $("task").hidden || performance.now() - lastActive > leaseMs) return;
    let r = null;
    try { r = await api("GET", `/api/v1/rounds/${roundId}/next`); } catch (e) { return; }
    if (r.status === 200 && r.data.task && r.data.task.assignment_id !== task.assignment_id) {
      notice("This item went to another rater while the page was idle; your answer to it cannot be saved.");
    }
  }, Math.max(5000, Math.min(60000, leaseMs / 3)));

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || !task) return;
    const typing = document.activeElement === rationale;
    const el = document.activeElement;
    const onPage = typing || el === document.body || el === null || "choice" in el.dataset || "strength" in el.dataset;
    // Enter submits from the rationale box, the page or a clicked choice; a focused link or other button
    // (Sign out, Rate) keeps its own Enter
    if (ev.key === "Enter" && !ev.shiftKey && onPage && !(typing && touch)) { ev.preventDefault(); submit(); return; }
    if (typing) { if (ev.key === "Escape") rationale.blur(); return; }
    const k = ev.key.toLowerCase();
    const map = { "1": "left", "2": "right", "3": "tie", "t": "tie" };
    if (k in map) { ev.preventDefault(); choose(map[k]); return; }
    const s = { "a": 1, "s": 2, "d": 3 }[k];
    if (s) { ev.preventDefault(); strength = s; render(); return; }
    if (k === "r") { ev.preventDefault(); rationale.focus(); }
  });

  loadNext();
})();

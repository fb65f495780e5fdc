"""The single page served at "/": a bare-bones browser client for the chat."""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dmb chat</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; }
  #log { border: 1px solid #bbb; height: 22rem; overflow-y: auto; padding: .5rem; }
  #log div { white-space: pre-wrap; }
  .meta { color: #777; }
  .announce { color: #a40; }
  .job { color: #06a; }
  form { display: flex; gap: .5rem; margin-top: .5rem; }
  input[type=text] { flex: 1; }
</style>
</head>
<body>
<h1>dmb chat</h1>
<form id="join">
  <label>Room
    <input id="room" type="text" value="lobby" pattern="[A-Za-z0-9_-]{1,64}">
  </label>
  <label>Name <input id="name" type="text" value="guest" maxlength="64"></label>
  <button>Join</button>
</form>
<div id="log" aria-live="polite"></div>
<form id="say">
  <input id="text" type="text" placeholder="Say something" maxlength="2000" disabled>
  <button id="send" disabled>Send</button>
  <button id="job" type="button" disabled>Run a job</button>
  <button id="announce" type="button" disabled>Announce (HTTP)</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let ws = null;
let room = null;

function show(text, cls) {
  const line = document.createElement("div");
  line.textContent = text;
  if (cls) line.className = cls;
  $("log").appendChild(line);
  $("log").scrollTop = $("log").scrollHeight;
}

function enable(on) {
  for (const id of ["text", "send", "job", "announce"]) $(id).disabled = !on;
}

$("join").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (ws) ws.close();
  room = $("room").value;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/ws/rooms/${room}/`);
  ws.onopen = () => enable(true);
  ws.onclose = () => { enable(false); show("disconnected", "meta"); };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === "hello")
      show(`joined ${m.room}, served by worker pid ${m.pid}`, "meta");
    else if (m.type === "chat") show(`${m.sender || "?"}: ${m.text}`);
    else if (m.type === "announce") show(`announcement: ${m.text}`, "announce");
    else if (m.type === "job") show(`job ${m.job}: step ${m.step}/${m.steps}` +
                                    (m.done ? " (done)" : ""), "job");
    else if (m.type === "error") show(`error: ${m.error}`, "meta");
  };
});

$("say").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("text").value;
  if (!text || !ws) return;
  const sender = $("name").value;
  ws.send(JSON.stringify({type: "chat", text, sender, ts: Date.now() / 1000}));
  $("text").value = "";
});

$("job").addEventListener("click", () => {
  if (ws) ws.send(JSON.stringify({type: "job", steps: 5}));
});

$("announce").addEventListener("click", async () => {
  const text = prompt("Announcement text", "Hello from an HTTP view");
  if (!text) return;
  const r = await fetch(`/rooms/${room}/announce`, {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({text}),
  });
  if (!r.ok) show(`announce failed: HTTP ${r.status}`, "meta");
});
</script>
</body>
</html>
"""

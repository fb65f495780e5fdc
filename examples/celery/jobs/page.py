"""The example's only page, inline: start a job, watch it count."""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dmb jobs</title></head>
<body>
<h1>Background jobs over one shared-memory segment</h1>
<p><label>Steps <input id="steps" type="number" value="10" min="1" max="100">
</label> <button id="start">Start a job</button></p>
<ul id="jobs"></ul>
<script>
document.getElementById("start").onclick = async () => {
  const steps = document.getElementById("steps").value;
  const reply = await fetch("/jobs/", {method: "POST",
    body: new URLSearchParams({steps})});
  const job = await reply.json();
  const item = document.createElement("li");
  item.textContent = job.id + ": queued";
  document.getElementById("jobs").prepend(item);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws/jobs/${job.id}/`);
  ws.onmessage = (event) => {
    const m = JSON.parse(event.data);
    if (m.type === "progress") item.textContent = `${job.id}: ${m.done}/${m.total}`;
    if (m.type === "done" || m.state === "SUCCESS") {
      const r = m.result;
      item.textContent = `${job.id}: done by ${r.worker} (pid ${r.pid})`;
      ws.close();
    }
  };
};
</script>
</body></html>
"""

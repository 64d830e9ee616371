// The dashboard: progress bars move with every event; a job starting or ending redraws
// the sections it changes (disk states, running jobs, failures).
import { refresher } from "./app.js";
import { jobId, showJob } from "./jobview.js";
import { LiveSocket, connectionBadge } from "./live.js";

let connection = "connecting";
function showConnection() {
  const note = document.querySelector("[data-connection-note]");
  note?.classList.add("conn");
  connectionBadge(note)(connection);
}

const refreshSoon = refresher(showConnection);

new LiveSocket("/ws/dashboard/", {
  onStatus(state) {
    connection = state;
    showConnection();
  },
  onReconnect: refreshSoon,
  onMessage(message) {
    const row = document.querySelector(`#running [data-job-id="${jobId(message)}"]`);
    const isStateChange = "kind" in message;
    if (row && !isStateChange) showJob(row, message);
    else refreshSoon();
  },
});

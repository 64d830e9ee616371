// A WebSocket that reconnects by itself with growing pauses, and says how it is doing.

const DELAYS = [1000, 2000, 4000, 8000, 15000, 30000];

export class LiveSocket {
  // onReconnect runs when the socket is open again after a drop (or a failed first try):
  // events may have been missed meanwhile, so the caller reads the state afresh.
  constructor(path, { onMessage, onStatus = () => {}, onReconnect = () => {} }) {
    this.url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
    Object.assign(this, { onMessage, onStatus, onReconnect });
    this.failures = 0;
    this.dropped = false;
    this.stopped = false;
    window.addEventListener("online", () => this.retryNow());
    this.connect();
  }

  connect() {
    if (this.stopped) return;
    this.onStatus(this.dropped ? "reconnecting" : "connecting");
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.failures = 0;
      this.onStatus("live");
      if (this.dropped) this.onReconnect();
      this.dropped = false;
    });
    socket.addEventListener("message", (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch { return; }
      this.onMessage(data);
    });
    socket.addEventListener("close", () => {
      if (this.socket !== socket || this.stopped) return;
      this.dropped = true;
      const delay = DELAYS[Math.min(this.failures, DELAYS.length - 1)] * (0.8 + Math.random() * 0.4);
      this.failures += 1;
      this.onStatus("reconnecting");
      this.timer = setTimeout(() => this.connect(), delay);
    });
  }

  retryNow() {
    if (this.stopped || (this.socket && this.socket.readyState !== WebSocket.CLOSED)) return;
    clearTimeout(this.timer);
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.socket?.close();
  }
}

// Shows a socket's state in an element with data-connection: "connecting", "live", "reconnecting".
export function connectionBadge(element) {
  return (state) => {
    if (!element) return;
    element.hidden = false;
    element.dataset.connection = state;
    element.textContent = state;
  };
}

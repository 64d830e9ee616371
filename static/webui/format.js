// Sizes, durations and times in the words webui/templatetags/human.py uses.

const UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function size(count) {
  if (count === null || count === undefined || Number.isNaN(count)) return "—";
  let value = Number(count);
  let unit = UNITS[0];
  for (unit of UNITS) {
    if (Math.abs(value) < 1024 || unit === UNITS[UNITS.length - 1]) break;
    value /= 1024;
  }
  if (unit === "bytes") return `${Math.trunc(count)} byte${Math.trunc(count) === 1 ? "" : "s"}`;
  return `${Math.abs(value) < 100 ? value.toFixed(1) : value.toFixed(0)} ${unit}`;
}

export function exactBytes(count) {
  return `${Math.trunc(count).toLocaleString("en-US")} bytes`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return seconds >= 10 ? `${seconds.toFixed(0)} s` : `${seconds.toFixed(1)} s`;
  let minutes = Math.floor(Math.round(seconds) / 60);
  const secs = Math.round(seconds) % 60;
  if (minutes < 60) return minutes < 10 ? `${minutes} min ${String(secs).padStart(2, "0")} s` : `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  minutes %= 60;
  if (hours < 48) return `${hours} h ${String(minutes).padStart(2, "0")} min`;
  return `${Math.floor(hours / 24)} days ${hours % 24} h`;
}

export function amount(value, unit) {
  return unit === "bytes" ? size(value) : `${Math.trunc(value).toLocaleString("en-US")} ${unit}`;
}

export function rate(value, unit) {
  if (!value) return "—";
  return unit === "bytes" ? `${size(value)}/s` : `${value.toFixed(1)} ${unit}/s`;
}

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

export function relative(moment, now = new Date()) {
  let seconds = (now - moment) / 1000;
  const future = seconds < 0;
  seconds = Math.abs(seconds);
  if (seconds < 45) return future ? "in a moment" : "just now";
  for (const [limit, divisor, unit] of [[90 * 60, 60, "min"], [36 * 3600, 3600, "h"], [45 * 86400, 86400, "days"]]) {
    if (seconds < limit) {
      const count = Math.round(seconds / divisor);
      const name = unit === "days" && count === 1 ? "day" : unit;
      return future ? `in ${count} ${name}` : `${count} ${name} ago`;
    }
  }
  return `${String(moment.getDate()).padStart(2, "0")} ${MONTHS[moment.getMonth()]} ${moment.getFullYear()}`;
}

export function clock(moment) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${moment.getFullYear()}-${pad(moment.getMonth() + 1)}-${pad(moment.getDate())} ${pad(moment.getHours())}:${pad(moment.getMinutes())}`;
}

"""How ``snapvol`` shows each answer of the plugin on a terminal: tables and one-line
summaries, pure functions of the reply (``--json`` prints the reply itself instead)."""

from __future__ import annotations

from typing import Any

from .units import format_size


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def _size(value: int | None) -> str:
    return "-" if value is None else format_size(value)


def render_volumes(reply: dict[str, Any]) -> str:
    rows = [["NAME", "USED", "QUOTA", "MOUNTS", "CREATED", "OPTIONS"]]
    for v in reply.get("Volumes", []):
        opts = ",".join(f"{k}={val}" for k, val in sorted(v.get("options", {}).items()))
        rows.append([v["name"], _size(v.get("used_bytes")), _size(v.get("quota_bytes")),
                     str(v.get("mounts", 0)), v.get("created", ""), opts or "-"])
    return _table(rows)


def render_status(reply: dict[str, Any]) -> str:
    status = reply.get("Status", {})
    storage = status.get("storage", {})
    lines = [
        ("plugin", f"snapvol {status.get('version')} (pid {status.get('pid')}, "
                   f"up {status.get('uptime_seconds')} s)"),
        ("backend", status.get("backend", "?")),
        ("storage", ", ".join(f"{k}={v}" for k, v in storage.items())),
        ("volumes", f"{status.get('volumes')} ({status.get('volumes_in_use')} in use, "
                    f"{status.get('mounts')} mounts)"),
        ("options", ", ".join(status.get("options", []))),
    ]
    for volume, v in sorted((status.get("verifications") or {}).items()):
        lines.append(("verify", f"{volume}: {v['result']} ({v['snapshot'] or '-'}, "
                                f"{v['started']}, {v['seconds']} s)"))
    lines += [("damaged", f"{path} (a state file that did not parse, moved aside; remove it "
                          "once read)") for path in status.get("damaged_state_files", [])]
    return "\n".join(f"{key + ':':9} {value}" for key, value in lines)


def render_snapshots(reply: dict[str, Any]) -> str:
    snapshots = reply.get("Snapshots", [])
    verified = any(s.get("verified") for s in snapshots)     # the column only when it says something
    rows = [["VOLUME", "SNAPSHOT", "CREATED", "OWNER", *(["VERIFIED"] if verified else []),
             "KEPT FOR"]]
    rows += [[s["volume"], s["name"], s["created"], s.get("owner", ""),
              *([("passed" if s.get("verified") else "")] if verified else []),
              s.get("kept_for") or ""] for s in snapshots]
    return _table(rows)


def render_verify(result: dict[str, Any]) -> str:
    """A verification: one line, then (unless it passed) the check's last output lines."""
    head = (f"{result['volume']}@{result.get('snapshot') or '-'}: {result['result'].upper()} "
            f"in {result.get('seconds')} s ({result.get('image') or '-'}"
            f"{' ' + result['command'] if result.get('command') else ''})")
    message = (result.get("message") or "").rstrip()
    if result["result"] == "passed" or not message:
        return head
    return head + "\n" + "\n".join("  " + line for line in message.splitlines())


def render_prune(reply: dict[str, Any]) -> str:
    decisions = reply.get("Decisions", [])
    if not decisions:
        return "no automatic snapshots to consider"
    rows = [["VOLUME", "SNAPSHOT", "CREATED", "DECISION", "REASON"]]
    verb = "would delete" if reply.get("DryRun") else "deleted"
    for d in decisions:
        decision = "keep" if d["keep"] else ("FAILED" if d.get("error") else verb)
        reason = ", ".join(d["reasons"]) if d["keep"] else (d.get("error") or "no rule keeps it")
        rows.append([d["volume"], d["snapshot"], d["created"], decision, reason])
    return _table(rows)


def render_check(reply: dict[str, Any]) -> str:
    """One line per problem (and per repair done), each saying what --repair does."""
    lines = [f"repaired: {p['what']} ({p['repair']})" for p in reply.get("Repaired", [])]
    for problem in reply.get("Problems", []):
        action = (f"--repair would {problem['repair']}" if problem["repair"]
                  else problem.get("note") or "look at it yourself")
        lines.append(f"{problem['kind']}: {problem['what']}; {action}")
    return "\n".join(lines) or "consistent: nothing left over, nothing stale"


def render_done(reply: dict[str, Any]) -> str:
    return "done"


def render_role(reply: dict[str, Any]) -> str:
    detail = reply.get("Detail") or {}
    lines = [f"role:     {reply.get('Role')} (epoch {reply.get('Epoch')}, since "
             f"{detail.get('since', '-')})"]
    if reply.get("Fenced"):
        lines.append(f"fenced:   {reply['Fenced']}")
    if reply.get("Role") == "standby":
        lines.append(f"primary:  {reply.get('Primary') or 'unknown'}")
        if detail.get("synced"):
            lag = detail.get("lag_seconds")
            lines.append(f"synced:   {detail['synced']}"
                         + (f" (taken {detail.get('synced_at')}, {lag} s ago)" if lag is not None else ""))
        return "\n".join(lines)
    rows = [["STANDBY", "SYNCED", "LAG", "LAST ERROR"]]
    for s in detail.get("standbys", []):
        lag = "-" if s.get("lag_seconds") is None else f"{s['lag_seconds']} s"
        rows.append([s["target"], s.get("synced") or "-", lag, s.get("last_error") or "-"])
    if len(rows) > 1:
        lines.append(_table(rows))
    return "\n".join(lines)


def render_sync(reply: dict[str, Any]) -> str:
    results = reply.get("Results") or {}
    return "\n".join(f"{t}: {e or 'synced'}" for t, e in results.items()) or \
        "nothing to do (a sync or hand-off of the volume is running)"


def render_handoff(reply: dict[str, Any]) -> str:
    h = reply.get("Handoff", {})
    if h.get("note"):
        return f"{h['volume']}: {h['note']} (primary {h.get('primary')})"
    return (f"{h['volume']} is primary on {h['primary']} now (epoch {h['epoch']}); this host "
            f"is its standby. Final delta {h.get('bytes', 0)} bytes, {h.get('seconds')} s.")


def render_promote(reply: dict[str, Any]) -> str:
    p = reply.get("Promoted", {})
    text = f"{p['volume']} is primary here (epoch {p['epoch']})"
    return text + (f"; {p['note']}" if p.get("note") else "")


def render_trash(reply: dict[str, Any]) -> str:
    entries = reply.get("Trash", [])
    ttl = reply.get("TtlSeconds", 0)
    if not entries:
        return "the trash is empty" + ("" if ttl else " (and off: SNAPVOL_TRASH_TTL=0)")
    rows = [["NAME", "ID", "REMOVED", "SIZE", "SNAPSHOTS", "EXPIRES"]]
    for e in entries:
        snapshots = e.get("Snapshots")
        expires = e.get("ExpiresAt") or "-"
        if e.get("State", "trashed") != "trashed":
            expires = f"({e['State']})"
        rows.append([e.get("Name") or "?", e["Id"], e.get("RemovedAt", ""), _size(e.get("UsedBytes")),
                     "-" if snapshots is None else str(snapshots), expires])
    return _table(rows)


def render_restored(reply: dict[str, Any]) -> str:
    return f"restored volume {reply.get('Restored')}"


def render_purged(reply: dict[str, Any]) -> str:
    purged = reply.get("Purged", [])
    if not purged:
        return "nothing to purge"
    return "\n".join(f"purged {p.get('Name') or '?'} ({p['Id']})" for p in purged)

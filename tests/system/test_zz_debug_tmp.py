"""temporary debug."""
from __future__ import annotations
from unitctl import Service
from test_systemd_unit import _alice

def test_debug(service: Service) -> None:
    """debug."""
    _alice(service, "submitted-1")
    m = service.machine
    done = m.run(["runuser", "-l", "alice", "-c", "batchd submit --timeout 20 ~/submitted-1"])
    out = [str(done)]
    for cmd in [
        "ls -la /var/lib/batchd /var/lib/batchd/inbox /var/lib/batchd/inbox/normal /var/lib/batchd/outbox",
        "ls -laR /var/lib/batchd/inbox/normal /var/lib/batchd/outbox | head -80",
        "cat /var/lib/batchd/outbox/*/status.json | head -c 3000",
        "runuser -l alice -c 'id; cat /var/lib/batchd/outbox/submitted-1/status.json | head -c 500; batchd --help | head -5'",
        "journalctl -u batchd --no-pager -n 60",
        "cat /etc/batchd/config.toml",
        "ls -la /etc/batchd",
    ]:
        r = m.run(["bash", "-c", cmd])
        out.append(f"$ {cmd}\n{r.stdout}\n{r.stderr}")
    open("/tmp/batchd-debug.txt", "w").write("\n".join(out))

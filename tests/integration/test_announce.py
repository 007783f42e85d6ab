"""A node's DHT record (node/announce.py) read back by a client's lookup (client/dht_lookup.py)
on a real hivemind DHT, in a child process (the DHT forks). One key holds every node's
record: a node that moves to other blocks (a new Announcer for the same DHT peer) replaces its
record, the newest wins over the "offline" its old Announcer left, and its final "offline"
replaces that."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json
from pollinate.client.dht_lookup import fetch_peers
from pollinate.node.announce import AnnounceConfig, Announcer, start_dht

dht = start_dht([])
def announcer(start, end, address):
    return Announcer(dht, model_id="tiny", start=start, end=end, address=address, throughput=5.0,
                     cache_tokens_left=lambda: 8, config=AnnounceConfig())
def seen():
    return [(p.start, p.end, p.state, p.address) for p in fetch_peers(dht, "tiny", 4, timeout_s=10)]
out = []
first = announcer(0, 2, "h:1")
first.start()
out.append(seen())
first.stop()  # "offline" for 0:2, then the move's new span
second = announcer(2, 4, "h:1")
second.start()
out.append(seen())
second.stop()
out.append(seen())
dht.shutdown()
print(json.dumps(out))
"""


def test_one_record_per_node_follows_its_moves():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    online, moved, left = json.loads(done.stdout.strip().splitlines()[-1])
    assert online == [[0, 2, "online", "h:1"]]
    assert moved == [[2, 4, "online", "h:1"]]
    assert left == [[2, 4, "offline", "h:1"]]

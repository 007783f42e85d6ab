"""A node's DHT record (node/announce.py) read back by a client's lookup (client/dht_lookup.py)
on a real hivemind DHT, in a child process (the DHT forks). One key holds every node's
record: a node that moves to other blocks (a new Announcer for the same DHT peer) replaces its
record, the newest wins over the "offline" its old Announcer left, and its final "offline"
replaces that. Records carry a tag made with the swarm token, which survives the DHT's round
trip (fields and expiration come back exactly): a reader with the token keeps them, one with
another token drops them, and so does it a record stored again to expire later than it signs."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json
from pollinate.client.dht_lookup import fetch_peers
from pollinate.node.announce import AnnounceConfig, Announcer, spans_key, start_dht

dht = start_dht([])
def announcer(start, end, address):
    return Announcer(dht, model_id="tiny", start=start, end=end, address=address, throughput=5.0,
                     cache_tokens_left=lambda: 8, config=AnnounceConfig(), token="swarm-token")
def seen(token="swarm-token"):
    return [(p.start, p.end, p.state, p.address) for p in fetch_peers(dht, "tiny", 4, token=token, timeout_s=10)]
out = []
first = announcer(0, 2, "h:1")
first.start()
out.append(seen())
out.append(seen("another-token"))
out.append(seen(None))
first.stop()  # "offline" for 0:2, then the move's new span
second = announcer(2, 4, "h:1")
second.start()
out.append(seen())
second.stop()
out.append(seen())
# the node's last record, stored again by someone else to expire an hour later than it signs
found = dht.get(spans_key("tiny"), latest=True)
(entry,) = found.value.values()
assert dht.store(spans_key("tiny"), entry.value, entry.expiration_time + 3600, subkey=second.peer_id)
out.append(seen())
out.append(seen(None))
dht.shutdown()
print(json.dumps(out))
"""


def test_one_record_per_node_follows_its_moves_tagged_with_the_token():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    online, other_token, no_token, moved, left, restored, restored_open = json.loads(
        done.stdout.strip().splitlines()[-1])
    assert online == [[0, 2, "online", "h:1"]]
    assert other_token == []  # a reader with another swarm's token
    assert no_token == online  # an open swarm's reader ignores tags
    assert moved == [[2, 4, "online", "h:1"]]
    assert left == [[2, 4, "offline", "h:1"]]
    assert restored == [] and restored_open == left
